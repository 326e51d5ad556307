"""``gap3d bench`` + ``gap3d plan`` on the tiny preset, then the real run: does the plan hold?

Targets (issue 11): storage within 10 %, encode and train time within 30 %, peak memory
within 25 %. On a shared 2-core CI machine timings are noisy, so the test keeps the two
sides in the same conditions: it calibrates right before the real run, both use one torch
thread in fresh processes (probes and the real ``gap3d train`` are subprocesses; the encode
workers are Dask worker processes of the same cluster setup), and the real run does several
times the bench's work, so the plan extrapolates (samples, shards, steps, validations,
checkpoints) rather than replays. Fixed costs (cluster start, model load, process start-up)
are measured by the bench and are part of the plan.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gap3d.config import load_config
from gap3d.plan import calibration
from gap3d.plan.bench import run_bench
from gap3d.plan.plan import make_plan
from gap3d.plan.synthetic import write_synthetic_shards
from gap3d.plan.validate import compare, format_rows, real_cache, real_train

N_REAL = 384  # samples of the real run (24 shards); the bench encodes 64
STEPS = 240  # steps of the real run; the bench's trainer probe runs ~15 s worth


def _overrides(root: Path) -> list[str]:
    return [
        f"workdir={root}",
        "cluster.n_workers=1",
        "cluster.threads_per_worker=1",
        "cluster.torch_threads=1",
        "data.samples_per_shard=16",
        f"train.max_steps={STEPS}",
        "train.val_every_n_steps=60",
        "train.checkpoint_every_n_steps=60",
        "train.log_every_n_steps=20",
    ]


@pytest.mark.slow
def test_plan_matches_the_real_tiny_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # probes and `gap3d train` alike
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = _overrides(tmp_path)
    cfg = load_config("tiny", overrides)

    # 1. calibrate right before the run (the bench writes under <workdir>/bench)
    cal_path = tmp_path / "calibration.json"
    run_bench(cfg, cal_path, samples=64, skip=("train-step",), threads=1, say=lambda m: None)

    # 2. plan the real run from the calibration file
    plan = make_plan(cfg, N_REAL, calibration=calibration.load(cal_path), knobs=False)
    assert plan["target"]["measured"] and plan["sources"]["storage"] == "measured"
    assert plan["sources"]["train step time"] == "measured"

    # 3. the real run: cache stage as `gap3d cache` runs it, then `gap3d train`
    shards = write_synthetic_shards(
        tmp_path / "shards", N_REAL, cfg.data.samples_per_shard, cfg.data.download_image_size, 1
    )
    cache = real_cache(cfg, shards)
    assert cache["samples"] == N_REAL
    train = real_train("tiny", overrides, dict(os.environ), log=tmp_path / "train.log")

    # 4. compare
    rows = compare(plan, cache, train)
    table = format_rows(rows)
    (tmp_path / "validation.txt").write_text(table)
    print("\n" + table)
    details = json.dumps({k: plan[k] for k in ("encode", "train")}, indent=1, default=str)
    for r in rows:
        assert r["ok"], f"{r['what']} missed its target\n{table}\n{details[:4000]}"
