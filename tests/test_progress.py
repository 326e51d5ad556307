"""Progress for logs: plain lines when stdout is not a terminal, quiet Lightning."""

from __future__ import annotations

import logging

import pytest

from gap3d.progress import Progress, format_eta, plain_output, progress_line
from gap3d.trainer.progress import TextProgress, quiet_lightning


def test_plain_lines_carry_rate_eta_and_values(capsys, monkeypatch):
    monkeypatch.setenv("GAP3D_PROGRESS", "plain")
    assert plain_output()
    with Progress(10, "train regressor baseline", unit="step", every_s=0.0) as bar:
        for i in range(10):
            bar.update(1, loss=1.0 / (i + 1))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10  # 9 periodic lines (interval 0) + the final one
    assert lines[0].startswith("train regressor baseline: 1/10 step (10%)")
    assert "step/s" in lines[0] and "ETA" in lines[0] and "loss 1" in lines[0]
    assert "10/10 step (100%)" in lines[-1] and "done in" in lines[-1] and "loss 0.1" in lines[-1]
    assert "\r" not in capsys.readouterr().err


def test_terminal_gets_a_bar_and_no_lines(capsys, monkeypatch):
    monkeypatch.setenv("GAP3D_PROGRESS", "bar")
    assert not plain_output()
    with Progress(3, "x", every_s=0.0) as bar:
        bar.update(3)
    assert capsys.readouterr().out == ""


def test_helpers():
    assert format_eta(42) == "42 s" and format_eta(600) == "10 min 00 s"
    assert format_eta(4 * 3600 + 120) == "4 h 02 min" and format_eta(float("nan")) == "?"
    line = progress_line("cache", 5, None, "sample", 2.0, samples_per_s="2.5")
    assert line.startswith("cache: 5 sample, 2.50 sample/s") and "samples_per_s 2.5" in line


def test_lightning_tips_are_dropped_and_warnings_kept(caplog):
    quiet_lightning()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        log.info("💡 Tip: For seamless cloud logging, try installing [litlogger](https://...)")
        log.info("GPU available: False, used: False")
        log.info("`Trainer.fit` stopped: `max_steps=3` reached.")
        log.warning("something worth seeing")
    text = caplog.text
    assert "Tip" not in text and "GPU available" not in text
    assert "max_steps=3" in text and "worth seeing" in text


class _Trainer:
    def __init__(self, step: int, total: int) -> None:
        self.global_step, self.max_steps = step, total
        self.is_global_zero, self.sanity_checking = True, False
        self.optimizers = []
        self.callback_metrics = {"val/patch/cosine": 0.8, "val/loss": 0.5}


def test_text_progress_prints_step_rate_eta_loss():
    lines: list[str] = []
    cb = TextProgress(every_s=0.0, printer=lambda m, flush=True: lines.append(m))
    tr = _Trainer(0, 100)
    cb.on_train_start(tr, None)
    for step in range(1, 5):
        tr.global_step = step
        cb.on_train_batch_end(tr, None, {"loss": 0.25}, None, step)
    cb.on_validation_end(tr, None)
    assert "starting at step 0 of 100" in lines[0]
    assert lines[1].startswith("train: step 1/100 (1%)") and "step/s" in lines[1]
    assert "ETA" in lines[1] and "loss 0.2500" in lines[1]
    assert lines[-1].startswith("val @ step 4") and "patch/cosine 0.8000" in lines[-1]


@pytest.mark.parametrize("value", ["plain", "bar"])
def test_forced_modes(monkeypatch, value):
    monkeypatch.setenv("GAP3D_PROGRESS", value)
    assert plain_output() is (value == "plain")


@pytest.mark.parametrize("mode, expect_bar", [("plain", False), ("bar", True)])
def test_model_loading_bars_only_on_a_terminal(mode, expect_bar):
    """transformers' "Loading weights" bar (carriage returns) stays out of a log."""
    import os
    import subprocess
    import sys

    code = (
        "from gap3d.config import load_config\n"
        "from gap3d.encoders.registry import build_prompt_encoder\n"
        "build_prompt_encoder(load_config('demo').prompt_encoder)\n"
    )
    env = {**os.environ, "GAP3D_PROGRESS": mode, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert ("Loading weights" in run.stderr) is expect_bar
