"""``gap3d demo`` end to end on the tiny preset: every stage, the summary and its headline."""

from __future__ import annotations

import json
import shutil

import pytest

from gap3d.demo import TARGETS, run_demo


@pytest.mark.slow
def test_demo_runs_every_stage_and_prints_the_headline(tiny_data, tmp_path, capsys):
    work = tmp_path / "demo"
    shutil.copytree(
        tiny_data.workdir, work, ignore=shutil.ignore_patterns("features.zarr", "train", "eval")
    )
    cfg = tiny_data.config(
        **{
            "train.max_steps": 6,
            "train.warmup_steps": 1,
            "train.val_every_n_steps": 6,
            "train.checkpoint_every_n_steps": 6,
            "eval.regressor_steps": 2,
            "eval.steps": 2,
            "sample.steps": 2,
        }
    )
    cfg.workdir = str(work)
    report = run_demo(cfg, ["a red cube", "an azure doughnut"])
    out = capsys.readouterr().out
    assert set(report["timings_s"]) == {
        "demo-data",
        "download",
        "cache",
        "train",
        "eval",
        "generate",
    }
    assert "all 1 partitions already done" in out or "already" in out  # the copied download
    assert "headline (ours" in out and "new-word prompts, held-out combinations" in out
    assert "peak RSS" in out
    saved = json.loads((work / "demo_summary.json").read_text())
    assert saved["targets"] == TARGETS and saved["headline"]["total_s"] > 0
    assert saved["headline"]["heldout_in_vocabulary"] is not None
    gen = work / "generate" / "demo"
    assert (gen / "results.md").exists() and len(report["generated"]) == 2
    assert all(
        (gen / g["out_dir"].split("/")[-1] / "result.json").exists() for g in report["generated"]
    )
    # a rerun skips the finished stages (the regressor baseline comes from its cache)
    again = run_demo(cfg, ["a red cube"])
    assert again["metrics"]["settings"]["regressor"]["cached"] is True
