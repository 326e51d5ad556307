"""Training progress for logs, and a quieter Lightning.

* :class:`TextProgress` replaces Lightning's progress bar when stdout is not a terminal
  (``gap3d.progress.plain_output``): every ``GAP3D_PROGRESS_S`` seconds one line with the
  step, steps/s, ETA, the mean training loss since the last line and the learning rate, and
  one line per validation with its headline metrics.
* :func:`quiet_lightning` drops Lightning's advertising ("Tip: ... try installing litlogger")
  and the "GPU/TPU available: False" lines of a CPU run from its log output; warnings and
  everything else pass through.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from gap3d.progress import format_eta, interval_s

# Substrings of Lightning info lines that say nothing about this run.
_NOISE = (
    "💡 Tip",
    "litlogger",
    "litmodels",
    "GPU available: False",
    "TPU available: False",
    "HPU available: False",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(s in msg for s in _NOISE)


_FILTER = _DropNoise()


def quiet_lightning() -> None:
    """Install the noise filter on Lightning's rank-zero loggers (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)


def _scalar(x: Any) -> float | None:
    try:
        return float(x.detach()) if hasattr(x, "detach") else float(x)
    except (TypeError, ValueError):
        return None


class TextProgress(Callback):
    """Plain progress lines: ``train: step 120/500 (24%), 2.31 step/s, ETA 2 min 44 s, ...``."""

    VAL_KEYS = ("val/loss", "val/patch/cosine", "val/cls/cosine")

    def __init__(self, every_s: float | None = None, printer: Any = print) -> None:
        self.every_s = interval_s() if every_s is None else every_s
        self.printer = printer
        self._t0 = self._last = 0.0
        self._start_step = 0
        self._losses: list[float] = []

    def _say(self, msg: str) -> None:
        self.printer(msg, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = self._last = time.perf_counter()
        self._start_step = trainer.global_step
        if trainer.is_global_zero:
            self._say(
                f"train: starting at step {trainer.global_step} of {trainer.max_steps}; a "
                f"progress line every {self.every_s:.0f} s"
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        value = _scalar(loss) if loss is not None else None
        if value is not None:
            self._losses.append(value)
        now = time.perf_counter()
        last_step = trainer.global_step >= trainer.max_steps
        if not trainer.is_global_zero or (now - self._last < self.every_s and not last_step):
            return
        self._last = now
        self._say(self.line(trainer, now))
        self._losses.clear()

    def line(self, trainer: pl.Trainer, now: float) -> str:
        step, total = trainer.global_step, trainer.max_steps
        done = step - self._start_step
        elapsed = max(now - self._t0, 1e-9)
        rate = done / elapsed
        parts = [f"train: step {step}/{total} ({100.0 * step / max(total, 1):.0f}%)"]
        parts.append(f"{rate:.2f} step/s")
        if step < total and rate > 0:
            parts.append(f"ETA {format_eta((total - step) / rate)}")
        else:
            parts.append(f"elapsed {format_eta(elapsed)}")
        if self._losses:
            parts.append(f"loss {sum(self._losses) / len(self._losses):.4f}")
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if opt is not None:
            parts.append(f"lr {opt.param_groups[0]['lr']:.2e}")
        return ", ".join(parts)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        vals = [f"{k.removeprefix('val/')} {float(m[k]):.4f}" for k in self.VAL_KEYS if k in m]
        if vals:
            self._say(f"val @ step {trainer.global_step} (EMA weights): " + ", ".join(vals))
