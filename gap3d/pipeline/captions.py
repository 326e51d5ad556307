"""Seeded, varied captions for the demo renders.

A caption always names the asset's shape and colour (through a synonym), so a text encoder
can learn both; everything else varies: template and word order, an optional size word
derived from the asset's scale, a proportion word (tall cylinder, thin ring), a generic
material word and, sometimes, the viewpoint. Synonyms are chosen so that none of them is
ambiguous between two shapes or two colours of the default palette.

The vocabulary is deliberately wide (about ten names per colour, many of them without the
basic colour word: "ruby", "cobalt blue", "marigold"): an aligner that only ever sees "red"
can key on one word piece, one that sees many names of a colour has to use what the frozen
text encoder knows about colour names, which is what carries over to words it never saw.
The words of the new-word evaluation (``gap3d.evaluation.novel_words``) are kept out of this
file on purpose; ``tests/test_novel_words.py`` checks that no caption can contain them.
"""

from __future__ import annotations

import numpy as np

SHAPE_SYNONYMS: dict[str, list[str]] = {
    "cube": ["cube", "box", "cubic block", "block", "square block", "cubic box"],
    "sphere": ["sphere", "ball", "orb", "round ball", "spherical ball"],
    "cylinder": ["cylinder", "tube", "round column", "cylindrical can", "can"],
    "cone": ["cone", "conical shape", "cone shape", "conical spike"],
    "torus": ["torus", "ring", "ring shape", "toroid", "hoop"],
    "capsule": ["capsule", "pill", "rounded rod", "pill shape"],
    "pyramid": ["pyramid", "square pyramid", "four-sided pyramid"],
    "prism": ["prism", "triangular prism", "three-sided prism", "triangular bar"],
    "cuboid": ["cuboid", "rectangular block", "brick", "rectangular box"],
    "tetrahedron": ["tetrahedron", "triangular pyramid", "four-faced solid"],
    "octahedron": ["octahedron", "eight-sided solid", "double pyramid"],
    "icosahedron": ["icosahedron", "twenty-sided solid", "d20 shape"],
}

COLOUR_SYNONYMS: dict[str, list[str]] = {
    "red": [
        "red",
        "bright red",
        "deep red",
        "cherry red",
        "ruby",
        "ruby red",
        "tomato red",
        "strawberry red",
        "carmine",
        "blood-red",
    ],
    "green": [
        "green",
        "emerald green",
        "grass green",
        "leaf green",
        "bright green",
        "pine green",
        "shamrock green",
        "fern green",
        "apple green",
        "kelly green",
    ],
    "blue": [
        "blue",
        "cobalt blue",
        "royal blue",
        "bright blue",
        "ultramarine",
        "sky blue",
        "cornflower blue",
        "ocean blue",
        "denim blue",
        "electric blue",
    ],
    "yellow": [
        "yellow",
        "lemon yellow",
        "golden yellow",
        "sunflower yellow",
        "banana yellow",
        "butter yellow",
        "bright yellow",
        "daffodil yellow",
        "sunny yellow",
    ],
    "orange": [
        "orange",
        "tangerine",
        "bright orange",
        "pumpkin orange",
        "carrot orange",
        "marigold",
        "burnt orange",
        "mango orange",
        "papaya orange",
    ],
    "purple": [
        "purple",
        "violet",
        "plum purple",
        "deep purple",
        "grape purple",
        "royal purple",
        "orchid purple",
        "eggplant purple",
        "mulberry",
    ],
    "white": [
        "white",
        "snow-white",
        "pure white",
        "milk-white",
        "chalk white",
        "bright white",
        "cotton white",
        "paper white",
    ],
    "black": [
        "black",
        "jet-black",
        "coal-black",
        "pitch-black",
        "ink-black",
        "midnight black",
        "soot black",
        "deep black",
        "raven black",
    ],
    "grey": ["grey", "gray", "neutral grey", "slate grey", "ash grey"],
    "gray": ["gray", "grey", "neutral gray", "slate gray", "ash gray"],
    "violet": ["violet", "purple"],
    "pink": ["pink", "rose pink", "light pink", "bubblegum pink"],
    "brown": ["brown", "chocolate brown", "dark brown", "coffee brown"],
    "cyan": ["cyan", "turquoise", "aqua"],
}

MATERIALS = ["matte", "plastic", "smooth", "solid", "simple"]

TEMPLATES = [
    "{a} {size}{colour} {shape}",
    "{a} {material} {colour} {shape}{view}",
    "a 3D render of {a} {size}{colour} {shape}",
    "{a} {shape} that is {colour}",
    "{a} {size}{shape}, coloured {colour}",
    "{a} {size}{material} {shape} in {colour}{view}",
    "3D model of {a} {colour} {shape}",
    "{a} {prop}{colour} {shape} on a plain background",
    "the {shape} is {colour}",
    "{colour} {shape}, {material} finish",
    "{a} {prop}{shape} painted {colour}",
    "render of a single {colour} {shape}{view}",
]


def _proportion_word(shape: str, proportions: dict[str, float]) -> str:
    """A word for an unusual proportion ('' when the shape looks ordinary)."""
    p = proportions
    if shape in ("cylinder", "cone") and "height" in p:
        return "tall" if p["height"] > 1.5 else ("short" if p["height"] < 0.95 else "")
    if shape == "capsule" and "height" in p:
        return "long" if p["height"] > 0.95 else ""
    if shape == "torus" and "thickness" in p:
        return "thick" if p["thickness"] > 0.4 else ("thin" if p["thickness"] < 0.3 else "")
    if shape == "pyramid" and "height" in p:
        return "tall" if p["height"] > 1.05 else ("flat" if p["height"] < 0.75 else "")
    if shape == "prism" and "length" in p:
        return "long" if p["length"] > 1.25 else ""
    return ""


def _size_word(scale: float | None, rng: np.random.Generator) -> str:
    if scale is None:
        return ""
    if scale < 0.68:
        return str(rng.choice(["small", "little", "tiny"]))
    if scale > 0.84:
        return str(rng.choice(["large", "big"]))
    return ""


def _view_phrase(elevation_deg: float | None, rng: np.random.Generator) -> str:
    if elevation_deg is None or rng.random() < 0.5:
        return ""
    if elevation_deg >= 35:
        return str(rng.choice([", seen from above", ", viewed from slightly above"]))
    return str(rng.choice([", seen from the side", ", side view"]))


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def make_caption(
    shape: str,
    colour: str,
    rng: np.random.Generator,
    *,
    scale: float | None = None,
    proportions: dict[str, float] | None = None,
    elevation_deg: float | None = None,
) -> str:
    """One caption naming ``shape`` and ``colour``; other details are drawn from ``rng``."""
    if shape not in SHAPE_SYNONYMS:
        raise ValueError(
            f"no caption vocabulary for shape '{shape}'; known: {list(SHAPE_SYNONYMS)}"
        )
    if colour not in COLOUR_SYNONYMS:
        raise ValueError(
            f"no caption vocabulary for colour '{colour}'; known: {list(COLOUR_SYNONYMS)}"
        )
    template = str(rng.choice(TEMPLATES))
    words = {
        "shape": str(rng.choice(SHAPE_SYNONYMS[shape])),
        "colour": str(rng.choice(COLOUR_SYNONYMS[colour])),
        "material": str(rng.choice(MATERIALS)),
        "view": _view_phrase(elevation_deg, rng),
    }
    size = _size_word(scale, rng)
    prop = _proportion_word(shape, proportions or {}) if rng.random() < 0.7 else ""
    words["size"] = f"{size} " if size else ""
    words["prop"] = f"{prop} " if prop else ""
    # The article agrees with whatever word follows it in this template.
    after_a = template.split("{a} ", 1)[1] if "{a} " in template else ""
    first = (after_a.format(**words, a="").split() or [words["shape"]])[0]
    text = template.format(**words, a=_article(first))
    return " ".join(text.split()).replace(" ,", ",")


def make_captions(
    shape: str,
    colour: str,
    n: int,
    rng: np.random.Generator,
    *,
    scale: float | None = None,
    proportions: dict[str, float] | None = None,
    elevation_deg: float | None = None,
) -> list[str]:
    """``n`` captions, distinct where the vocabulary allows (a few redraws, then repeats)."""
    out: list[str] = []
    for _ in range(n):
        for _attempt in range(10):
            c = make_caption(
                shape,
                colour,
                rng,
                scale=scale,
                proportions=proportions,
                elevation_deg=elevation_deg,
            )
            if c not in out:
                break
        out.append(c)
    return out
