"""``gap3d app`` backend and page (no browser): clear errors, outputs of one request."""

from __future__ import annotations

import json
import shutil

import pytest
from _inference_fixtures import tiny_setup
from PIL import Image

from gap3d.app.backend import AppBackend, AppError
from gap3d.cli import main as gap3d_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


def test_no_aligner_yet_is_reported_not_crashed(setup, tmp_path):
    backend = AppBackend(setup.cfg(), aligner_dir=tmp_path / "nothing", out_root=tmp_path / "o")
    assert not backend.ready()
    assert "No aligner trained yet" in backend.status() and "make demo" in backend.status()
    with pytest.raises(AppError, match="No aligner trained yet"):
        backend.generate("a red square")


def test_one_request_writes_glb_previews_pca_and_json(setup, tmp_path):
    backend = AppBackend(setup.cfg("sample.steps=2"), out_root=tmp_path / "app")
    assert backend.ready() and backend.supports_images() is True  # tiny = Qwen2.5-VL
    assert "qwen2_5_vl" in backend.status() and "retrieval" in backend.status()
    res = backend.generate("a blue circle", seed=3, steps=2, cfg_scale=2.0)
    assert res.out_dir.parent == tmp_path / "app"
    assert res.glb is not None and res.glb.suffix == ".glb" and res.glb.stat().st_size > 0
    assert len(res.previews) == 2 and all(p.exists() for p in res.previews)
    assert res.pca is not None and Image.open(res.pca).width > 0
    assert res.result["settings"]["seed"] == 3 and res.result["settings"]["steps"] == 2
    assert res.result["settings"]["cfg_scale"] == 2.0
    assert json.loads((res.out_dir / "result.json").read_text())["prompt"] == "a blue circle"
    assert "best asset" in res.summary() and "a blue circle" in res.summary()
    # the request's settings never leak into the next one
    assert backend._session.cfg.sample.seed == setup.cfg().sample.seed
    # a text + image prompt works with a VLM prompt encoder
    img = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(img)
    assert backend.generate("like this", image=img, steps=2).result["image"] == str(img)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "   "}, "Type a prompt first"),
        ({"prompt": "a cube", "steps": 0}, "Steps must be between"),
        ({"prompt": "a cube", "cfg_scale": -1.0}, "CFG scale must be between"),
        ({"prompt": "a cube", "image": "/no/such/file.png"}, "does not exist"),
    ],
)
def test_bad_requests_get_clear_messages(setup, tmp_path, kwargs, message):
    backend = AppBackend(setup.cfg(), out_root=tmp_path / "app")
    with pytest.raises(AppError, match=message):
        backend.generate(**kwargs)


def test_image_with_a_text_only_encoder_is_refused(setup, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(setup.export_dir, export)
    meta = json.loads((export / "aligner.json").read_text())
    key = "manifest" if "manifest" in meta else "store_manifest"
    meta[key]["prompt_encoder"].update(name="sentence", supports_images=False)
    (export / "aligner.json").write_text(json.dumps(meta))
    backend = AppBackend(setup.cfg(), aligner_dir=export, out_root=tmp_path / "app")
    assert backend.supports_images() is False and "text prompts only" in backend.status()
    img = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(img)
    with pytest.raises(AppError, match="text-only"):
        backend.generate("a red square", image=img)


def test_page_builds_with_every_input_and_output(setup, tmp_path):
    from gap3d.app.ui import build_ui

    ui = build_ui(AppBackend(setup.cfg(), out_root=tmp_path / "app"))
    ids = {getattr(b, "elem_id", None) for b in ui.blocks.values()}
    for elem in (
        "gap3d-prompt",
        "gap3d-image",
        "gap3d-generate",
        "gap3d-model",
        "gap3d-previews",
        "gap3d-pca",
        "gap3d-result",
        "gap3d-summary",
    ):
        assert elem in ids, elem
    names = {type(b).__name__ for b in ui.blocks.values()}
    assert {"Model3D", "Gallery", "JSON", "Slider", "Number", "Dataset"} <= names


def test_app_help_names_the_local_address(capsys):
    with pytest.raises(SystemExit) as e:
        gap3d_main(["app", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "127.0.0.1" in out and "--port" in out and "--aligner" in out
