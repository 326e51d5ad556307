"""The new-word evaluation set: prompts whose colour or shape words no training caption uses.

The demo's captions (``gap3d.pipeline.captions``) name each colour and shape through a fixed
list of synonyms. A user types other words ("an azure doughnut"), so we measure how the
aligner does on words it never saw. The words below are common English names of the demo's
colours and shapes, picked from general usage (not by how well any model handles them) and
kept **out of the caption generator**: ``captions.py`` never imports this module, and
``tests/test_novel_words.py`` checks that no caption the generator can write contains one
of them. At evaluation time :func:`caption_vocabulary` re-reads the captions actually written
to the library and drops any word found there, so a changed caption list can never leak into
this set unnoticed.

Three kinds of prompt, each for every (shape, colour) combination of the library:

* ``colour``: a new colour word with a training shape word ("a scarlet cube");
* ``shape``: a training colour word with a new shape word ("a red doughnut");
* ``both``: new words for both ("a scarlet doughnut").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# New names per palette colour (never in a training caption).
NOVEL_COLOUR_WORDS: dict[str, list[str]] = {
    "red": ["scarlet", "crimson", "vermilion"],
    "green": ["jade", "lime", "verdant"],
    "blue": ["azure", "sapphire", "cerulean", "navy"],
    "yellow": ["canary", "saffron", "mustard"],
    "orange": ["apricot", "amber", "persimmon"],
    "purple": ["lilac", "lavender", "amethyst", "mauve"],
    "white": ["ivory", "alabaster", "snowy", "pearl"],
    "black": ["ebony", "onyx", "obsidian", "charcoal"],
}

# New names per demo shape (never in a training caption).
NOVEL_SHAPE_WORDS: dict[str, list[str]] = {
    "cube": ["dice", "crate"],
    "sphere": ["globe", "marble", "bubble"],
    "cylinder": ["drum", "canister", "pillar"],
    "cone": ["funnel", "party hat"],
    "torus": ["doughnut", "donut", "bagel", "lifebuoy"],
    "capsule": ["lozenge", "sausage"],
    "pyramid": ["ziggurat"],
    "prism": ["tent", "toblerone", "wedge"],
}

# The plain words the prompts use for the known side of "colour" / "shape" prompts.
KNOWN_TEMPLATES = [
    "a {colour} {shape}",
    "3D model of a {colour} {shape}",
    "the {shape} is {colour}",
    "a small {colour} {shape} on a plain background",
]
KINDS = ("colour", "shape", "both")


@dataclass
class NovelPrompt:
    """One evaluation prompt and the (shape, colour) it asks for."""

    text: str
    shape: str
    colour: str
    kind: str  # "colour" | "shape" | "both"
    heldout: bool  # the (shape, colour) combination was never trained on
    colour_word: str
    shape_word: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def words_of(text: str) -> set[str]:
    """Lower-case words of a text (letters only: "snow-white" -> snow, white)."""
    return set(re.findall(r"[a-z]+", text.lower()))


def caption_vocabulary(captions: Iterable[str]) -> set[str]:
    """Every word used by ``captions``."""
    out: set[str] = set()
    for c in captions:
        out |= words_of(c)
    return out


def library_captions(library: dict[str, Any]) -> list[str]:
    """All captions written for a demo library (``library.json`` as a dict)."""
    return [c for a in library.get("assets", []) for v in a.get("views", []) for c in v["captions"]]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _fill(template: str, colour: str, shape: str) -> str:
    text = template.format(colour=colour, shape=shape)
    # fix the article in front of the first filled word ("a azure" -> "an azure")
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def novel_prompts(
    combos: Iterable[tuple[str, str]],
    heldout: set[tuple[str, str]],
    used_words: set[str],
    known_colour: dict[str, list[str]],
    known_shape: dict[str, list[str]],
    per_kind: int = 1,
    seed: int = 0,
) -> tuple[list[NovelPrompt], dict[str, Any]]:
    """Seeded prompts of every kind for every ``(shape, colour)`` in ``combos``.

    ``used_words`` is the caption vocabulary of the training data: a new word (or any word of
    a multi-word name) found there is dropped. ``known_colour`` / ``known_shape`` give the
    training words used on the known side (their first entry, the plain name, is used).
    Combinations without a new word of the needed kind are skipped. Returns the prompts and
    a note on which words were usable.
    """
    colour_words = {
        c: [w for w in ws if not (words_of(w) & used_words)] for c, ws in NOVEL_COLOUR_WORDS.items()
    }
    shape_words = {
        s: [w for w in ws if not (words_of(w) & used_words)] for s, ws in NOVEL_SHAPE_WORDS.items()
    }
    dropped = sorted(
        {w for ws in NOVEL_COLOUR_WORDS.values() for w in ws}
        - {w for ws in colour_words.values() for w in ws}
        | {w for ws in NOVEL_SHAPE_WORDS.values() for w in ws}
        - {w for ws in shape_words.values() for w in ws}
    )
    rng = np.random.default_rng([seed, 0xC0105])
    out: list[NovelPrompt] = []
    for shape, colour in combos:
        plain_colour = (known_colour.get(colour) or [colour])[0]
        plain_shape = (known_shape.get(shape) or [shape])[0]
        for kind in KINDS:
            cands_c = colour_words.get(colour, []) if kind in ("colour", "both") else [plain_colour]
            cands_s = shape_words.get(shape, []) if kind in ("shape", "both") else [plain_shape]
            if not cands_c or not cands_s:
                continue
            for _ in range(per_kind):
                cw = str(rng.choice(cands_c))
                sw = str(rng.choice(cands_s))
                template = str(rng.choice(KNOWN_TEMPLATES))
                out.append(
                    NovelPrompt(
                        text=_fill(template, cw, sw),
                        shape=shape,
                        colour=colour,
                        kind=kind,
                        heldout=(shape, colour) in heldout,
                        colour_word=cw,
                        shape_word=sw,
                    )
                )
    note = {
        "colour_words": {c: ws for c, ws in colour_words.items() if ws},
        "shape_words": {s: ws for s, ws in shape_words.items() if ws},
        "dropped_as_seen_in_captions": dropped,
    }
    return out, note
