"""Figures with their sources, the plan's inputs, and the assumptions a plan may use.

Every number a plan shows is a :class:`Fig` carrying its source: ``measured`` (a calibration
made on the device the plan is for), ``published`` (a vendor figure of a named GPU), or
``analytic`` (counted - store layout, FLOPs and memory traced through the real code - or
assumed, as the figure's note says). The assumptions below are used only where nothing was
measured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gap3d.config import Gap3dConfig
from gap3d.plan.hardware import DeviceSpec

MEASURED, PUBLISHED, ANALYTIC = "measured", "published", "analytic"

# Assumptions used only where nothing was measured (each figure that uses one says so).
MFU_TRAIN = 0.35  # share of peak bf16 FLOP/s a training step reaches (eager PyTorch, no compile)
MFU_INFER = 0.40  # same for the frozen encoders' and the sampler's forward passes
HOST_S_PER_SAMPLE = 0.02  # CPU work per sample in an encode task (decode, resize, write)
STARTUP_S = 60.0  # process start, model load, cluster start on a GPU node
CUDA_CONTEXT_BYTES = 0.8e9  # CUDA context + PyTorch runtime per GPU process
ALLOCATOR_SLACK = 1.10  # caching-allocator fragmentation over live tensor bytes
OPT_BYTES_PER_PARAM = 40  # AdamW (read p, g, m, v; write p, m, v) + EMA (read p, r/w shadow), fp32
DISK_MB_S = 1000.0  # checkpoint write / store read speed when none was measured
JPEG_BITS_PER_PIXEL = 3.0  # web photos at JPEG quality 95 (img2dataset's default)
# Text columns per sample when no store was measured (caption, url, key, meta JSON, split).
TEXT_BYTES = {"caption": 100, "url": 80, "key": 12, "meta": 60, "split": 6, "reason": 1}
SHARD_INDEX_BYTES = 16  # Zarr v3 sharding index: (offset, nbytes) uint64 per inner chunk

GROUPS = {
    "image tokens": ("image_tokens", "image_scale"),
    "prompt latents": ("prompt_latents", "prompt_mask"),
    "thumbnails": ("thumbnail",),
    "metadata": ("valid", "caption", "key", "url", "split", "meta", "reason"),
}


@dataclass
class Fig:
    """A number with the source it came from and how it was obtained."""

    value: float
    source: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "note": self.note}


@dataclass
class Target:
    """The device a plan is for."""

    kind: str  # "cpu" | "cuda"
    name: str
    memory_bytes: float
    memory_source: str
    spec: DeviceSpec | None = None  # published figures, for a named GPU
    measured: bool = False  # the calibration was made on this device

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.to_dict() if self.spec else None
        return d


@dataclass
class PlanInputs:
    cfg: Gap3dConfig
    pairs: int
    gpus: int  # devices for encode workers (GPU) and training (GPU); see Planner
    target: Target
    calibration: dict[str, Any] | None = None
    epochs: float | None = None
    mfu_train: float = MFU_TRAIN
    mfu_infer: float = MFU_INFER
    grad_ckpt: bool = False
    notes: list[str] = field(default_factory=list)


def calib_device(cal: dict[str, Any]) -> str:
    from gap3d.plan.calibration import device_label

    return device_label(cal)


def val_rows(cfg: Gap3dConfig, n: int) -> int:
    """Validation rows the trainer carves out of ``n`` train-split samples: a share
    (``train.val_fraction``, rounded, at least 1) where the config has one, else
    ``train.val_samples``."""
    frac = getattr(cfg.train, "val_fraction", None)
    n_val = int(round(n * frac)) if frac is not None else int(cfg.train.val_samples)
    return min(max(n_val, 1), max(n - 1, 1))


def _group_bytes(per_array: dict[str, float], names: tuple[str, ...]) -> float:
    return float(sum(per_array.get(n, 0.0) for n in names))
