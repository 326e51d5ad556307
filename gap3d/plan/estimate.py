"""The estimator behind ``gap3d plan``: storage, encode, training and memory for N pairs.

Every number is a :class:`Fig` that carries its source:

* ``measured``: from a calibration (``gap3d bench``) made on the device the plan is for;
* ``published``: a vendor figure of a named GPU (``gap3d/plan/hardware.py``), combined with
  FLOPs and an assumed utilisation - shown as ``analytic`` since the result is a model;
* ``analytic``: counted (store layout, FLOPs and memory traced through the real code) or
  assumed (stated in the figure's note).

Measured figures are scaled to other settings with analytic ratios (e.g. a batch size the
calibration did not run: step time x traced FLOPs ratio), and the figure says so.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gap3d.config import Gap3dConfig
from gap3d.layout import TokenLayout
from gap3d.plan.estimate_encode import EncodeEstimates
from gap3d.plan.estimate_train import TrainEstimates
from gap3d.plan.figures import (
    ANALYTIC,
    DISK_MB_S,
    GROUPS,
    JPEG_BITS_PER_PIXEL,
    MEASURED,
    PUBLISHED,
    SHARD_INDEX_BYTES,
    TEXT_BYTES,
    Fig,
    PlanInputs,
    Target,
    _group_bytes,
    val_rows,
)
from gap3d.plan.trace import AlignerCase

__all__ = [
    "ANALYTIC",
    "MEASURED",
    "PUBLISHED",
    "Fig",
    "PlanInputs",
    "Planner",
    "Target",
    "val_rows",
]


class Planner(EncodeEstimates, TrainEstimates):
    """Estimates for one config; ``ref`` is the config the calibration measured (default: the
    calibration's own), from which measured figures are scaled."""

    def __init__(self, inp: PlanInputs, ref: Gap3dConfig | None = None) -> None:
        self.inp = inp
        self.cfg = inp.cfg
        self.cal = inp.calibration or {}
        if ref is None and self.cal.get("bench_config"):
            from gap3d.config import ConfigError, config_from_dict

            try:
                ref = config_from_dict(self.cal["bench_config"], source="<calibration>")
            except ConfigError as e:  # written by a gap3d with other config keys
                inp.notes.append(
                    f"the calibration's config does not load with this gap3d ({e}); its "
                    "figures are taken as measured for this config's settings"
                )
        self.ref = ref or inp.cfg
        self.t = inp.target
        from gap3d.plan.models import encoder_shapes

        cal_train = self.cal.get("train", {})
        if cal_train.get("layout") and self._same_encoders():
            self.layout = TokenLayout.from_dict(cal_train["layout"])
            self.prompt_dim = int(cal_train["prompt_dim"])
        else:
            self.layout, self.prompt_dim = encoder_shapes(self.cfg)

    # ------------------------------------------------------------------ helpers
    def _same_encoders(self) -> bool:
        """Did the calibration run this config's encoders (or their paper-shapes stand-ins)?"""
        bc = self.cal.get("bench_config")
        if not bc:
            return False
        from gap3d.encoders.shapes import arch_for_model

        for role in ("prompt_encoder", "image_encoder"):
            a, b = bc[role]["model"], getattr(self.cfg, role).model
            if a != b and not (arch_for_model(a) and arch_for_model(a) == arch_for_model(b)):
                return False
            if (
                role == "image_encoder"
                and bc[role]["image_size"] != self.cfg.image_encoder.image_size
            ):
                return False
        return True

    @property
    def workers(self) -> int:
        """Encode workers: one per GPU on a GPU target, ``cluster.n_workers`` on a CPU."""
        return self.inp.gpus if self.t.kind == "cuda" else self.cfg.cluster.n_workers

    @property
    def train_devices(self) -> int:
        return self.inp.gpus if self.t.kind == "cuda" else self.cfg.train.devices

    @property
    def precision(self) -> str:
        from gap3d.plan.bench_train import plan_precision

        return plan_precision(self.cfg.train.precision, self.t.kind)

    def case(self, cfg: Gap3dConfig | None = None, grad_ckpt: bool | None = None) -> AlignerCase:
        cfg = cfg or self.cfg
        return AlignerCase.make(
            self.layout,
            cfg.prompt_encoder.max_length,
            self.prompt_dim,
            cfg.aligner,
            cfg.train.batch_size,
            self.inp.grad_ckpt if grad_ckpt is None else grad_ckpt,
            self.precision,
            cfg.train.weight_decay,
        )

    def _measured_train(self) -> bool:
        """Calibration training figures apply: same device kind, encoders and precision."""
        tr = self.cal.get("train", {})
        return bool(
            self.t.measured
            and self._same_encoders()
            and tr.get("precision") == self.precision
            and not self.cal.get("paper_shapes")
        )

    def _disk_rate(self, key: str) -> tuple[float, str]:
        """Store/checkpoint disk speed (MB/s): measured where the calibration is the target
        machine's, else an assumption (the calibration machine's disk says nothing about the
        GPU nodes' storage)."""
        rate = (self.cal.get("store") or {}).get(key)
        if rate and self.t.measured:
            return float(rate), "measured"
        return DISK_MB_S, "assumed"

    def _peak_flops(self) -> float:
        if self.t.spec is not None:
            return self.t.spec.bf16_tflops * 1e12
        mm = self.cal.get("device", {}).get("matmul_tflops", {})
        return float(mm.get("float32") or 0.1) * 1e12

    def _peak_note(self) -> str:
        if self.t.spec is not None:
            return f"bf16 peak, {self.t.spec.source} (published)"
        return "measured fp32 matmul"

    # ------------------------------------------------------------------ storage
    def storage(self) -> dict[str, Any]:
        """Bytes per sample and in total, per component, for every encoding x compression."""
        from gap3d.store.manifest import StoreSpec
        from gap3d.store.schema import array_layout

        cal_store = self.cal.get("store") if self._same_encoders() else None
        combos: dict[str, Any] = {}
        for enc in ("float16", "int8"):
            for comp in ("none", "zstd"):
                combo = f"{enc}/{comp}"
                spec = StoreSpec(
                    self.layout,
                    self.prompt_dim,
                    self.cfg.prompt_encoder.max_length,
                    1,
                    self.cfg.data.samples_per_shard,
                    encoding=enc,
                    compression=comp,
                )
                layout = array_layout(spec)
                per_array, sources = {}, {}
                for name, a in layout.items():
                    raw = (
                        float(
                            np.prod(a["shape"][1:], dtype=np.int64) * np.dtype(a["dtype"]).itemsize
                        )
                        if a["dtype"] != "str"
                        else None
                    )
                    sharded = a["shards"] is not None
                    measured = (cal_store or {}).get("on_disk", {}).get(combo, {}).get(name)
                    cal_raw = (
                        (cal_store or {})
                        .get("layout", {})
                        .get(combo, {})
                        .get(name, {})
                        .get("bytes_per_sample")
                    )
                    if measured is not None and raw is not None and cal_raw:
                        per_array[name] = raw * measured / cal_raw
                        sources[name] = MEASURED
                    elif measured is not None and raw is None:
                        per_array[name] = float(measured)
                        sources[name] = MEASURED
                    elif raw is not None and a["compression"] == "none":
                        per_array[name] = raw + (SHARD_INDEX_BYTES if sharded else 0)
                        sources[name] = ANALYTIC
                    elif raw is not None:
                        per_array[name] = raw + (SHARD_INDEX_BYTES if sharded else 0)
                        sources[name] = ANALYTIC  # zstd gain unknown: none assumed
                    else:
                        per_array[name] = float(TEXT_BYTES.get(name, 1))
                        sources[name] = ANALYTIC
                groups = {}
                for g, names in GROUPS.items():
                    b = _group_bytes(per_array, names)
                    srcs = {sources[n] for n in names if n in sources}
                    groups[g] = {
                        "bytes_per_sample": b,
                        "total_bytes": b * self.inp.pairs,
                        "source": MEASURED if srcs == {MEASURED} else ANALYTIC,
                    }
                total = sum(v["bytes_per_sample"] for v in groups.values())
                combos[combo] = {
                    "groups": groups,
                    "per_array": per_array,
                    "bytes_per_sample": total,
                    "total_bytes": total * self.inp.pairs,
                }
        configured = f"{self.cfg.store.encoding}/{self.cfg.store.compression}"
        # Files that do not grow with the samples: Zarr metadata, the manifest, statistics,
        # commit markers (one per shard).
        n_shards = math.ceil(self.inp.pairs / self.cfg.data.samples_per_shard)
        fixed_cal = (cal_store or {}).get("fixed_bytes", {}).get(configured)
        if fixed_cal is not None and "shard_overhead_bytes" in cal_store:
            fixed = fixed_cal + cal_store["shard_overhead_bytes"] * n_shards
        else:  # metadata + manifest, a commit record per shard (assumed sizes)
            fixed = 64e3 + 400.0 * n_shards
        enc_cal = self.cal.get("encode", {}) if self._same_encoders() else {}
        if enc_cal.get("source_shard_bytes_per_sample"):
            shard_b = Fig(
                enc_cal["source_shard_bytes_per_sample"],
                MEASURED,
                f"bench shards: {enc_cal.get('data', 'synthetic')}"
                + (
                    "; real photos are usually larger"
                    if "synthetic" in enc_cal.get("data", "synthetic")
                    else ""
                ),
            )
        else:
            s = self.cfg.data.download_image_size
            shard_b = Fig(
                s * s * 4 / 3 * JPEG_BITS_PER_PIXEL / 8 + 500,
                ANALYTIC,
                f"JPEG q95 at {JPEG_BITS_PER_PIXEL} bits/pixel, 4:3 images, + caption/json",
            )
        return {
            "configured": configured,
            "combos": combos,
            "fixed_bytes": fixed,
            "store_bytes": combos[configured]["total_bytes"] + fixed,
            "source_shards": {
                "bytes_per_sample": shard_b.value,
                "total_bytes": shard_b.value * self.inp.pairs,
                "source": shard_b.source,
                "note": shard_b.note,
            },
        }
