"""New-word evaluation end to end on a tiny aligner (random init: plumbing, not quality)."""

from __future__ import annotations

import json

import pytest
import trimesh
from _inference_fixtures import _draw, tiny_setup

from gap3d.evaluation.novel_eval import hits_table, novel_word_eval
from gap3d.evaluation.novel_words import KINDS, NOVEL_COLOUR_WORDS, NovelPrompt, words_of
from gap3d.inference.generators.retrieval import build as build_retrieval
from gap3d.trainer.export import load_aligner

SHAPES = {"cube": "square", "sphere": "circle", "prism": "triangle"}
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """The tiny store/aligner, and a library whose shapes carry demo names."""
    setup = tiny_setup(tmp_path_factory)
    root = tmp_path_factory.mktemp("demo_like_lib")
    (root / "renders").mkdir()
    (root / "meshes").mkdir()
    glb = trimesh.creation.box().export(file_type="glb")
    assets = []
    for shape, drawn in SHAPES.items():
        for colour, rgb in COLOURS.items():
            aid = f"{shape}-{colour}-00"
            views = []
            for v in range(2):
                rel = f"renders/{aid}_{v}.png"
                _draw(drawn, rgb, v).save(root / rel)
                views.append({"view": v, "path": rel, "captions": [f"a {colour} {shape}"]})
            (root / "meshes" / f"{aid}.glb").write_bytes(glb)
            held = (shape, colour) == ("prism", "blue")
            assets.append(
                {
                    "asset_id": aid,
                    "shape": shape,
                    "colour": colour,
                    "split": "heldout" if held else "train",
                    "glb": f"meshes/{aid}.glb",
                    "views": views,
                }
            )
    lib = {"assets": assets, "heldout_combos": [["prism", "blue"]]}
    (root / "library.json").write_text(json.dumps(lib))
    return setup, root


def test_new_word_eval_reports_every_kind_and_group(demo_like):
    setup, lib = demo_like
    cfg = setup.cfg(f"generator.library={lib}", "eval.steps=2", "eval.novel_prompts_per_kind=2")
    aligner = load_aligner(setup.export_dir, "cpu")
    gen = build_retrieval(cfg, aligner.manifest)
    calls = []

    def zero(hidden, mask):
        calls.append(hidden.shape)
        return gen.index.tokens[:1].expand(hidden.shape[0], -1, -1).clone()

    res = novel_word_eval(cfg, aligner, {"first_view": zero}, gen, aligner.manifest)
    # 6 combos x 3 kinds x 2 prompts each
    assert res["n_prompts"] == 36 and len(res["prompts"]) == 36
    assert calls and calls[0][0] == 36  # the baseline saw every prompt
    for method in ("ours", "first_view", "encoder_nearest"):
        table = res["methods"][method]
        assert set(table) == {*KINDS, "all"}
        for kind in KINDS:
            assert set(table[kind]) == {"seen", "heldout", "all"}
            assert table[kind]["heldout"]["n"] == 2  # one held-out combo, 2 prompts
            for g in table[kind].values():
                assert 0.0 <= g["shape_colour"] <= min(g["shape"], g["colour"]) <= 1.0
    # a constant prediction always retrieves the first asset (cube, red)
    fv = res["methods"]["first_view"]["all"]["all"]
    assert fv["shape_colour"] == pytest.approx(6 / 36)
    used = {"a", "red", "blue", "cube", "sphere", "prism"}
    for p in res["prompts"]:
        assert p["top1_ours"] and p["top1_first_view"] == "cube-red-00"
        if p["kind"] != "shape":
            assert not (words_of(p["colour_word"]) & used)
            assert p["colour_word"] in NOVEL_COLOUR_WORDS[p["colour"]]
    assert 0.0 <= res["encoder_understood"]["share"] <= 1.0


def test_shapes_without_new_words_get_only_new_colour_prompts(demo_like):
    setup, _ = demo_like
    cfg = setup.cfg("eval.steps=2")  # the tiny library: square/circle/triangle x red/green/blue
    aligner = load_aligner(setup.export_dir, "cpu")
    gen = build_retrieval(cfg, aligner.manifest)
    res = novel_word_eval(cfg, aligner, {}, gen, aligner.manifest)
    assert res["n_prompts"] == 9 and {p["kind"] for p in res["prompts"]} == {"colour"}
    assert set(res["methods"]["ours"]) == {"colour", "all"}
    off = novel_word_eval(
        setup.cfg("eval.novel_prompts_per_kind=0"), aligner, {}, gen, aligner.manifest
    )
    assert "skipped" in off


def test_hits_table_counts_shape_and_colour_separately():
    ps = [
        NovelPrompt("x", "cube", "red", "colour", False, "scarlet", "cube"),
        NovelPrompt("y", "cube", "blue", "both", True, "azure", "dice"),
    ]
    t = hits_table([("cube", "red"), ("cube", "red")], ps)
    assert t["all"]["all"] == {"shape_colour": 0.5, "shape": 1.0, "colour": 0.5, "n": 2}
    assert t["both"]["heldout"]["shape_colour"] == 0.0 and "seen" not in t["both"]
