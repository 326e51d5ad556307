"""Two-process DDP on CPU (gloo) through the real CLI, so Lightning's launcher re-executes it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
from test_datamodule import PROMPT_LEN, make_synthetic_store


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    make_synthetic_store(tmp_path / "s.zarr", n_shards=3, per_shard=16)
    cmd = [
        sys.executable,
        "-m",
        "gap3d.cli",
        "train",
        "--config",
        "tiny",
        f"workdir={tmp_path}",
        f"store.path={tmp_path / 's.zarr'}",
        f"train.run_dir={tmp_path / 'run'}",
        f"prompt_encoder.max_length={PROMPT_LEN}",
        "train.accelerator=cpu",
        "train.devices=2",
        "train.strategy=ddp",
        "train.max_steps=6",
        "train.val_every_n_steps=3",
        "train.checkpoint_every_n_steps=3",
        "train.warmup_steps=1",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GAP3D_DEBUG": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    log = out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 0, log
    assert "device cpu x 2" in out.stdout, log
    assert out.stdout.count("final validation at step 6") == 1, log  # rank 0 prints only
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["ema"]["num_updates"] == 6
    assert (tmp_path / "run/export/aligner.safetensors").is_file()
    rows = list(csv.DictReader((tmp_path / "run/csv/version_0/metrics.csv").open()))
    assert sum(1 for r in rows if r.get("train/loss")) == 6
    assert any(r.get("val/patch/cosine") for r in rows)
