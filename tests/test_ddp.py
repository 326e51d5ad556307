"""Two-process DDP on CPU (gloo) through the real CLI, so Lightning's launcher re-executes it.

Checked with ``train.trace_batches`` (per rank and step: the store rows read and a digest of
the parameters after the step): ranks read disjoint halves of each global batch that together
are the single-process batch; replicas are identical after every step; a 2-process run killed
with SIGKILL mid-epoch and resumed ends with exactly the weights of an uninterrupted one; the
data statistics are computed once, by rank 0.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _kill import run_and_kill_when
from test_datamodule import PROMPT_LEN, make_synthetic_store

from gap3d.trainer.trace import read_trace

STEPS = 12  # 36 train rows / global batch 4 = 9 steps per epoch: the run crosses an epoch


def _cmd(tmp: Path, run_dir: Path, devices: int, batch: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gap3d.cli",
        "train",
        "--config",
        "tiny",
        f"workdir={tmp}",
        f"store.path={tmp / 's.zarr'}",
        f"train.run_dir={run_dir}",
        f"prompt_encoder.max_length={PROMPT_LEN}",
        "train.accelerator=cpu",
        f"train.devices={devices}",
        f"train.strategy={'ddp' if devices > 1 else 'auto'}",
        f"train.batch_size={batch}",
        f"train.max_steps={STEPS}",
        "train.val_every_n_steps=6",
        "train.checkpoint_every_n_steps=3",
        "train.warmup_steps=1",
        "train.trace_batches=true",
        "train.deterministic=true",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GAP3D_DEBUG": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }


def _run(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=cwd)
    log = out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 0, log
    return out.stdout


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("ddp")
    make_synthetic_store(tmp / "s.zarr", n_shards=3, per_shard=16)
    single = _run(_cmd(tmp, tmp / "single", 1, 4), tmp)
    ddp = _run(_cmd(tmp, tmp / "ddp", 2, 2), tmp)
    return {"tmp": tmp, "single": single, "ddp": ddp}


def test_ranks_shard_each_global_batch_and_stay_in_sync(ddp_runs) -> None:  # noqa: ANN001
    tmp = ddp_runs["tmp"]
    out = ddp_runs["ddp"]
    assert "device cpu x 2" in out and out.count(f"final validation at step {STEPS}") == 1
    single = read_trace(tmp / "single")[0]
    ranks = read_trace(tmp / "ddp")
    assert sorted(ranks) == [0, 1] and len(single) == len(ranks[0]) == len(ranks[1]) == STEPS
    for s, a, b in zip(single, ranks[0], ranks[1], strict=True):
        assert s["step"] == a["step"] == b["step"]
        assert not set(a["rows"]) & set(b["rows"])  # disjoint halves ...
        assert sorted(a["rows"] + b["rows"]) == sorted(s["rows"])  # ... of the same batch
        assert a["params"] == b["params"]  # identical replicas after every step
    ckpt = torch.load(tmp / "ddp/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS and ckpt["ema"]["num_updates"] == STEPS
    assert (tmp / "ddp/export/aligner.safetensors").is_file()
    rows = list(csv.DictReader((tmp / "ddp/csv/version_0/metrics.csv").open()))
    assert sum(1 for r in rows if r.get("train/loss")) == STEPS
    # data statistics and the mean-token baseline: computed by rank 0, loaded by rank 1
    assert out.count("computed the data statistics") == 1
    assert out.count("loaded the data statistics of rank 0") == 1


def test_ddp_kill_mid_epoch_and_resume_is_exact(ddp_runs) -> None:  # noqa: ANN001
    tmp = ddp_runs["tmp"]
    run = tmp / "killed"
    cmd = _cmd(tmp, run, 2, 2)
    trace = run / "trace" / "rank-0.jsonl"
    # step 7 done: the checkpoint of step 6 is on disk, epoch 0 is not over (9 steps)
    rc = run_and_kill_when(
        cmd,
        lambda: trace.exists() and trace.read_text().count("\n") >= 7,
        tmp / "killed.log",
        300,
        env=_env(),
        cwd=tmp,
    )
    assert rc == -signal.SIGKILL, (tmp / "killed.log").read_text()[-3000:]
    done = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert 3 <= done["global_step"] < 9, "the kill should land mid-epoch after a checkpoint"

    out = _run([*cmd, "--resume", "last"], tmp)
    assert "resuming from" in out
    a = torch.load(tmp / "ddp/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for k, v in a["ema"]["shadow"].items():
        assert torch.equal(v, b["ema"]["shadow"][k]), k
    # the replayed steps read the same rows as the uninterrupted run
    ref, got = read_trace(tmp / "ddp"), read_trace(run)
    for r in (0, 1):
        last = {line["step"]: line for line in got[r]}  # a replayed step's later line wins
        assert [last[line["step"]]["rows"] for line in ref[r]] == [line["rows"] for line in ref[r]]
        assert last[STEPS]["params"] == ref[r][-1]["params"]
