"""End-to-end training on a synthetic store: it learns, checkpoints load weights-only, and the
export loads without Lightning and matches `gap3d export` from the checkpoint."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_datamodule import make_synthetic_store, tiny_cfg

from gap3d.trainer.export_cli import export_checkpoint
from gap3d.trainer.train import resolve_precision, train


def read_csv(run_dir: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        rows += list(csv.DictReader(f.open()))
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict]:
    tmp = tmp_path_factory.mktemp("train")
    make_synthetic_store(tmp / "s.zarr", n_shards=4, per_shard=32)
    cfg = tiny_cfg(
        tmp,
        tmp / "s.zarr",
        "train.max_steps=200",
        "train.val_every_n_steps=100",
        "train.checkpoint_every_n_steps=100",
        "train.warmup_steps=10",
        "train.lr=3e-3",
    )
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    result = train(cfg)
    torch.set_num_threads(n)
    return cfg, result


def test_overfitting_beats_the_mean_feature_baseline(trained: tuple[object, dict]) -> None:
    cfg, result = trained
    assert result["step"] == 200
    rows = read_csv(cfg.run_dir)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 200
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)
    val = [r for r in rows if r.get("val/patch/cosine")]
    assert [int(r["step"]) for r in val] == [99, 199]  # Lightning logs at step index k-1
    m = result["metrics"]
    assert m["val/patch/cosine"] > float(val[0]["val/patch/cosine"])
    assert m["val/patch/cosine"] > m["val_baseline/patch/cosine"] + 0.2, m
    assert m["val/cls/cosine"] > m["val_baseline/cls/cosine"], m
    assert 0.0 < m["val_baseline/patch/cosine"] < 0.8


def test_checkpoint_loads_weights_only(trained: tuple[object, dict]) -> None:
    cfg, result = trained
    ckpt = torch.load(result["last_ckpt"], map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["config"]["aligner"]["preset"] == "tiny" and len(hp["config_hash"]) == 16
    assert hp["store_info"]["layout"]["channels"] == 8 and hp["store_info"]["prompt_dim"] == 16
    assert ckpt["global_step"] == 200 and ckpt["ema"]["num_updates"] == 200
    assert "flow.net.head.weight" in ckpt["state_dict"]
    assert json.loads((cfg.run_dir / "split.json").read_text())["val_samples"] > 0


def test_export_matches_cli_export_and_loads_without_lightning(
    trained: tuple[object, dict], tmp_path: Path
) -> None:
    cfg, result = trained
    end_of_training = load_file(str(Path(result["export_dir"]) / "aligner.safetensors"))
    again = export_checkpoint(result["last_ckpt"], tmp_path / "exp")
    from_ckpt = load_file(str(again / "aligner.safetensors"))
    assert end_of_training.keys() == from_ckpt.keys()
    assert all(torch.equal(end_of_training[k], from_ckpt[k]) for k in from_ckpt)
    # EMA weights, not the raw ones, are exported
    raw = torch.load(result["last_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    assert not torch.equal(raw["flow.net.head.weight"], from_ckpt["net.head.weight"])
    meta = json.loads((again / "aligner.json").read_text())
    assert meta["manifest"]["layout"] == meta["layout"] and meta["extra"]["step"] == 200
    code = (
        "import sys; from gap3d.trainer.export import load_aligner; import torch\n"
        f"a = load_aligner({str(result['export_dir'])!r})\n"
        "h = torch.randn(2, a.prompt_max_length, a.prompt_dim); m = torch.ones(2, 6, dtype=bool)\n"
        "x = a.sample(h, m, steps=2, cfg_scale=3.0, seed=0)\n"
        "assert x.shape == (2, 12, 8) and torch.isfinite(x).all(), x.shape\n"
        "assert 'lightning' not in sys.modules and 'lightning.pytorch' not in sys.modules\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_precision_auto_is_32_on_cpu() -> None:
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "auto") == "32-true"
