"""The new-word evaluation set: disjoint from every caption the generator can write."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gap3d.config import load_config
from gap3d.evaluation.novel_words import (
    KINDS,
    NOVEL_COLOUR_WORDS,
    NOVEL_SHAPE_WORDS,
    caption_vocabulary,
    novel_prompts,
    words_of,
)
from gap3d.pipeline import captions


def _generator_vocabulary() -> set[str]:
    """Every word any demo caption can contain: synonyms, templates, materials, fillers."""
    vocab: set[str] = set()
    for ws in (*captions.SHAPE_SYNONYMS.values(), *captions.COLOUR_SYNONYMS.values()):
        for w in ws:
            vocab |= words_of(w)
    for t in captions.TEMPLATES:
        vocab |= words_of(t.replace("{", " ").replace("}", " "))
    vocab |= caption_vocabulary(captions.MATERIALS)
    vocab |= {"small", "little", "tiny", "large", "big", "tall", "short", "long", "thick"}
    vocab |= {"thin", "flat", "seen", "from", "above", "viewed", "slightly", "side", "view"}
    return vocab


def test_no_new_word_can_appear_in_a_training_caption() -> None:
    vocab = _generator_vocabulary()
    demo = load_config("demo").data.demo
    # and the captions actually drawn for the default palette (many seeds, every shape/colour)
    rng = np.random.default_rng(0)
    for shape, colour in itertools.product(demo.shapes, demo.colours):
        for _ in range(40):
            c = captions.make_caption(
                shape, colour, rng, scale=float(rng.uniform(0.6, 0.9)), elevation_deg=40.0
            )
            vocab |= words_of(c)
    novel = {w for ws in NOVEL_COLOUR_WORDS.values() for w in ws}
    novel |= {w for ws in NOVEL_SHAPE_WORDS.values() for w in ws}
    leaked = {w for w in novel if words_of(w) & vocab}
    assert not leaked, f"new-word set leaks into the captions: {sorted(leaked)}"
    # the examples are in the set
    assert {"azure", "scarlet", "doughnut"} <= novel


def test_every_demo_shape_and_colour_has_new_words() -> None:
    demo = load_config("demo").data.demo
    assert set(demo.colours) <= set(NOVEL_COLOUR_WORDS)
    assert set(demo.shapes) <= set(NOVEL_SHAPE_WORDS)


def test_prompts_of_every_kind_for_every_combo() -> None:
    combos = [("cube", "red"), ("torus", "blue")]
    prompts, note = novel_prompts(
        combos, {("torus", "blue")}, set(), captions.COLOUR_SYNONYMS, captions.SHAPE_SYNONYMS, 2, 0
    )
    assert len(prompts) == len(combos) * len(KINDS) * 2
    for p in prompts:
        assert p.heldout == ((p.shape, p.colour) == ("torus", "blue"))
        new_c = p.colour_word in NOVEL_COLOUR_WORDS[p.colour]
        new_s = p.shape_word in NOVEL_SHAPE_WORDS[p.shape]
        assert (new_c, new_s) == {
            "colour": (True, False),
            "shape": (False, True),
            "both": (True, True),
        }[p.kind]
        assert p.colour_word in p.text and p.shape_word in p.text
        assert " a a" not in p.text and not any(f" a {v}" in p.text for v in "aeiou")
    again, _ = novel_prompts(
        combos, {("torus", "blue")}, set(), captions.COLOUR_SYNONYMS, captions.SHAPE_SYNONYMS, 2, 0
    )
    assert [p.text for p in again] == [p.text for p in prompts]  # seeded
    assert note["dropped_as_seen_in_captions"] == []


def test_words_seen_in_the_library_captions_are_dropped() -> None:
    used = {"scarlet", "crimson", "vermilion", "doughnut"}  # every red word + one torus word
    prompts, note = novel_prompts([("cube", "red"), ("torus", "blue")], set(), used, {}, {}, 1, 0)
    assert {"scarlet", "crimson", "vermilion", "doughnut"} <= set(
        note["dropped_as_seen_in_captions"]
    )
    assert all(p.colour_word not in used and p.shape_word not in used for p in prompts)
    # cube-red has no usable new colour word: only its new-shape prompt remains
    assert {p.kind for p in prompts if p.shape == "cube"} == {"shape"}


@pytest.mark.parametrize("shape", ["blob"])
def test_unknown_shapes_are_skipped(shape: str) -> None:
    prompts, _ = novel_prompts([(shape, "grey")], set(), set(), {}, {}, 1, 0)
    assert prompts == []
