"""The embedded demo library: meshes, headless renders, held-out split, captions, URL list."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import trimesh
from PIL import Image

from gap3d.config import Gap3dConfig, load_config
from gap3d.pipeline import captions, demo_data, render, shapes
from gap3d.pipeline.server import free_port


def _tiny_cfg(workdir: Path, *extra: str) -> Gap3dConfig:
    return load_config("tiny", [f"workdir={workdir}", f"data.demo.port={free_port()}", *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Gap3dConfig, dict]:
    # Colours chosen to span hue and brightness, so the colour check below means something.
    cfg = _tiny_cfg(
        tmp_path_factory.mktemp("demo"), "data.demo.colours=[red,green,blue,white,black]"
    )
    return cfg, demo_data.build_demo_library(cfg)


def _files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_library_lists_every_asset_with_files(built: tuple[Gap3dConfig, dict]) -> None:
    cfg, lib = built
    demo = cfg.data.demo
    assert len(lib["assets"]) == len(demo.shapes) * len(demo.colours) * demo.variants_per_combo
    assert {a["shape"] for a in lib["assets"]} == set(demo.shapes)
    for a in lib["assets"]:
        assert (cfg.assets_dir / a["glb"]).is_file()
        assert [v["view"] for v in a["views"]] == list(range(demo.views))
        assert all((cfg.assets_dir / v["path"]).is_file() for v in a["views"])
    assert demo_data.load_library(cfg.assets_dir) == lib
    with Image.open(cfg.assets_dir / demo_data.PREVIEW_FILE) as sheet:
        assert sheet.size[1] == 96 * len(demo.shapes)


def test_meshes_load_back_with_size_and_colour(built: tuple[Gap3dConfig, dict]) -> None:
    cfg, lib = built
    for a in lib["assets"]:
        mesh = trimesh.load(cfg.assets_dir / a["glb"], force="mesh")
        assert len(mesh.faces) > 0
        # The rotation changes the bounding box but not the farthest vertex pair much.
        extent = float(np.max(mesh.bounds[1] - mesh.bounds[0]))
        assert 0.6 * a["scale"] < extent < 1.8 * a["scale"]
        base = np.asarray(mesh.visual.material.baseColorFactor, dtype=float)
        base = base / 255.0 if base.max() > 1.0 else base  # trimesh may hand back uint8
        np.testing.assert_allclose(base[:3], shapes.srgb_to_linear(tuple(a["rgb"])), atol=0.01)


def test_renders_are_not_blank_and_show_the_named_colour(built: tuple[Gap3dConfig, dict]) -> None:
    cfg, lib = built
    palette = {c: np.array(rgb) for c, rgb in lib["colours"].items()}
    bg = np.array(render.BACKGROUND) * 255
    for a in lib["assets"]:
        for v in a["views"]:
            img = np.asarray(Image.open(cfg.assets_dir / v["path"]).convert("RGB"), dtype=float)
            assert img.shape == (cfg.data.demo.render_size, cfg.data.demo.render_size, 3)
            # The renderer's depth mask says how much of the frame the object covers; the
            # PNG must show a good part of it apart from the backdrop (white objects share
            # some brightness with the light backdrop, so not all of it).
            assert v["foreground_fraction"] > 0.03, f"{v['path']} looks blank"
            fg = np.abs(img - bg).sum(-1) > 30
            assert 0.5 * v["foreground_fraction"] < fg.mean() < 0.9, v["path"]
            # The mean colour of the visible object is nearest to its named colour.
            mean = img[fg].mean(0) / 255.0
            nearest = min(palette, key=lambda c: np.linalg.norm(palette[c] - mean))
            assert nearest == a["colour"], f"{v['path']}: mean {mean.round(2)} looks {nearest}"


def test_heldout_combos_absent_from_training_rows(built: tuple[Gap3dConfig, dict]) -> None:
    cfg, lib = built
    demo = cfg.data.demo
    held = {tuple(h) for h in lib["heldout_combos"]}
    n_combos = len(demo.shapes) * len(demo.colours)
    assert len(held) == round(demo.heldout_fraction * n_combos) > 0
    rows = pq.read_table(cfg.url_list_path).to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    assert not {(r["shape"], r["colour"]) for r in train} & held
    assert {r["shape"] for r in train} == set(demo.shapes)
    assert {r["colour"] for r in train} == set(demo.colours)
    assert {(r["shape"], r["colour"]) for r in rows if r["split"] == "heldout"} == held


def test_url_list_points_at_the_server(built: tuple[Gap3dConfig, dict]) -> None:
    cfg, lib = built
    table = pq.read_table(cfg.url_list_path)
    assert table.column_names == ["url", "caption", *demo_data.DEMO_COLUMNS]
    demo = cfg.data.demo
    assert table.num_rows == lib["n_renders"] * demo.captions_per_view
    for r in table.to_pylist():
        prefix = f"http://{demo.host}:{demo.port}/renders/{r['asset_id']}_{r['view']}.png"
        assert r["url"] == prefix


def test_captions_vary_and_name_shape_and_colour(built: tuple[Gap3dConfig, dict]) -> None:
    _, lib = built
    caps = [(a, c) for a in lib["assets"] for v in a["views"] for c in v["captions"]]
    assert len({c for _, c in caps}) > 0.8 * len(caps)
    for a, c in caps:
        assert any(w in c for w in captions.SHAPE_SYNONYMS[a["shape"]]), c
        assert any(w in c for w in captions.COLOUR_SYNONYMS[a["colour"]]), c


def test_rerun_is_a_noop_and_a_new_port_only_rewrites_urls(
    built: tuple[Gap3dConfig, dict],
) -> None:
    cfg, lib = built
    before = _files(cfg.work)
    assert demo_data.build_demo_library(cfg) == lib
    assert _files(cfg.work) == before
    cfg.data.demo.port = free_port()
    demo_data.build_demo_library(cfg)
    after = _files(cfg.work)
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed == {cfg.url_list_path}
    assert f":{cfg.data.demo.port}/" in pq.read_table(cfg.url_list_path)["url"][0].as_py()


def test_renders_are_deterministic(built: tuple[Gap3dConfig, dict], tmp_path: Path) -> None:
    cfg, lib = built
    a = lib["assets"][0]
    views = tuple(render.view_specs(cfg.data.demo.views))
    outs = tuple(str(tmp_path / f"{v.index}.png") for v in views)
    job = render.RenderJob(str(cfg.assets_dir / a["glb"]), tuple(a["rgb"]), views, outs)
    render.render_jobs([job], cfg.data.demo.render_size, processes=1)
    for v, out in zip(a["views"], outs, strict=True):
        old = np.asarray(Image.open(cfg.assets_dir / v["path"]), dtype=int)
        new = np.asarray(Image.open(out), dtype=int)
        assert np.abs(old - new).max() <= 2


def test_plan_is_seeded() -> None:
    demo = load_config("demo").data.demo
    a, b = demo_data.plan_assets(demo), demo_data.plan_assets(demo)
    assert a == b
    demo.seed = 1
    c = demo_data.plan_assets(demo)
    assert [x.scale for x in a] != [x.scale for x in c]


@pytest.mark.parametrize(
    "key, value, word",
    [
        ("shapes", ["cube", "blob"], "blob"),
        ("colours", ["red", "sparkly"], "sparkly"),
    ],
)
def test_unknown_names_are_rejected(key: str, value: list[str], word: str) -> None:
    demo = load_config("tiny").data.demo
    setattr(demo, key, value)
    with pytest.raises(ValueError, match=rf"{word}.*supported: .*cube|{word}.*supported: .*red"):
        demo_data.plan_assets(demo)


@pytest.mark.parametrize(
    "n_shapes, n_colours, fraction", [(8, 8, 0.125), (4, 3, 0.5), (1, 5, 0.5), (3, 3, 0.9)]
)
def test_heldout_choice_keeps_every_shape_and_colour(
    n_shapes: int, n_colours: int, fraction: float
) -> None:
    s_names = list(shapes.SHAPES)[:n_shapes]
    c_names = list(shapes.COLOURS)[:n_colours]
    for seed in range(5):
        held = demo_data.choose_heldout(s_names, c_names, fraction, seed)
        train = set(itertools.product(s_names, c_names)) - held
        assert {s for s, _ in train} == set(s_names) and {c for _, c in train} == set(c_names)
        assert len(held) <= round(fraction * n_shapes * n_colours)
        if n_shapes > 1 and n_colours > 1 and fraction <= 0.5:
            assert len(held) == round(fraction * n_shapes * n_colours)


@pytest.mark.parametrize("shape", list(shapes.SHAPES))
def test_every_shape_builds_a_normalised_mesh(shape: str) -> None:
    rng = np.random.default_rng(0)
    mesh = shapes.build_mesh(shape, shapes.sample_proportions(shape, rng), 0.8, [0, 0, 0])
    assert mesh.is_watertight and mesh.volume > 0
    assert np.max(mesh.bounds[1] - mesh.bounds[0]) == pytest.approx(0.8)
    np.testing.assert_allclose(mesh.bounds.mean(0), 0.0, atol=1e-6)
