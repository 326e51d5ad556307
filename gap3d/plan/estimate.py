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

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gap3d.config import Gap3dConfig
from gap3d.layout import TokenLayout
from gap3d.plan.hardware import DeviceSpec
from gap3d.plan.trace import AlignerCase, trace_sample_step, trace_train_step

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


def val_rows(cfg: Gap3dConfig, n: int) -> int:
    """Validation rows the trainer carves out of ``n`` train-split samples: a share
    (``train.val_fraction``, rounded, at least 1) where the config has one, else
    ``train.val_samples``."""
    frac = getattr(cfg.train, "val_fraction", None)
    n_val = int(round(n * frac)) if frac is not None else int(cfg.train.val_samples)
    return min(max(n_val, 1), max(n - 1, 1))


def _group_bytes(per_array: dict[str, float], names: tuple[str, ...]) -> float:
    return float(sum(per_array.get(n, 0.0) for n in names))


class Planner:
    """Estimates for one config; ``ref`` is the config the calibration measured (default: the
    calibration's own), from which measured figures are scaled."""

    def __init__(self, inp: PlanInputs, ref: Gap3dConfig | None = None) -> None:
        self.inp = inp
        self.cfg = inp.cfg
        self.cal = inp.calibration or {}
        if ref is None and self.cal.get("bench_config"):
            from gap3d.config import config_from_dict

            ref = config_from_dict(self.cal["bench_config"], source="<calibration>")
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

    # ------------------------------------------------------------------ storage
    def storage(self) -> dict[str, Any]:
        """Bytes per sample and in total, per component, for every encoding x compression."""
        from gap3d.store.files import array_layout
        from gap3d.store.manifest import StoreSpec

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
        if fixed_cal is not None and cal_store.get("shards"):
            per_shard = cal_store.get("marker_bytes", 0.0)
            fixed = fixed_cal + per_shard * (n_shards - cal_store["shards"])
        else:
            fixed = 64e3 + 400.0 * n_shards
        enc_cal = self.cal.get("encode", {}) if self._same_encoders() else {}
        if enc_cal.get("source_shard_bytes_per_sample"):
            shard_b = Fig(
                enc_cal["source_shard_bytes_per_sample"],
                MEASURED,
                "synthetic images at data.download_image_size; real photos are usually larger",
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

    # ------------------------------------------------------------------ encode
    def _shard_loads(self) -> float:
        """Samples the busiest encode worker gets: shards go out in order to the next free
        worker (round robin when shards take equal time); the last shard may be short."""
        S, N, W = self.cfg.data.samples_per_shard, self.inp.pairs, max(1, self.workers)
        full, last = divmod(N, S)
        n_shards = full + (1 if last else 0)
        q, r = divmod(n_shards, W)
        loads = [(q + (1 if i < r else 0)) * S for i in range(min(W, n_shards))]
        if last:
            loads[(n_shards - 1) % W] -= S - last
        return float(max(loads))

    def encode(self) -> dict[str, Any]:
        """Encode stage: per-sample time on the target, wall time on the workers, device hours."""
        enc = self.cal.get("encode", {}) if self._same_encoders() else {}
        N, W = self.inp.pairs, max(1, self.workers)
        same_batches = enc and all(
            enc[f"{role}_encoder"]["batch_size"] == getattr(self.cfg, f"{role}_encoder").batch_size
            for role in ("prompt", "image")
        )
        parts: dict[str, Fig] = {}
        if self.t.measured and enc and not self.cal.get("paper_shapes"):
            t = Fig(enc["task_s_per_sample"], MEASURED, "encode task per sample, this device")
            if not same_batches:
                t.note += " (measured at other encoder batch sizes)"
            parts["host"] = Fig(enc["host_s_per_sample"], MEASURED, "tar read, decode, write")
            parts["forward"] = Fig(enc["forward_s_per_sample"], MEASURED, "both encoders")
            startup = Fig(
                enc["cluster_start_s"] + enc["startup_s"],
                MEASURED,
                "cluster start, model load and warm-up, store creation",
            )
            finalize = Fig(enc["finalize_s_per_sample"] * N, MEASURED, "statistics pass")
        else:
            flops, fnote = self._encoder_flops(enc)
            peak = self._peak_flops()
            dev = flops / (peak * self.inp.mfu_infer)
            parts["forward"] = Fig(
                dev,
                ANALYTIC,
                f"{flops / 1e12:.2f} TFLOP/sample ({fnote}) / {peak / 1e12:.0f} TFLOP/s "
                f"{self._peak_note()} x {self.inp.mfu_infer:.0%} utilisation (assumed)",
            )
            if enc:
                pre = enc["image_encoder"].get("preprocess_s_per_sample", 0.0)
                host = Fig(
                    enc["host_s_per_sample"] + pre,
                    MEASURED,
                    "decode, preprocess, write: measured on the calibration machine's CPU",
                )
            else:
                host = Fig(HOST_S_PER_SAMPLE, ANALYTIC, "decode, resize, write (assumed)")
            parts["host"] = host
            t = Fig(host.value + dev, ANALYTIC, "host work + device forward, sequential per task")
            startup = Fig(STARTUP_S, ANALYTIC, "cluster start + model load (assumed)")
            bytes_tok = self.storage()["combos"][self.storage()["configured"]]["groups"][
                "image tokens"
            ]["bytes_per_sample"]
            rate, how = self._disk_rate("read_mb_s")
            finalize = Fig(
                N * bytes_tok / (rate * 1e6),
                ANALYTIC,
                f"statistics pass reads the image tokens once at {rate:.0f} MB/s ({how})",
            )
        per_worker = self._shard_loads()
        tasks = per_worker * t.value
        wall = startup.value + tasks + finalize.value
        cpu = None
        if self.t.measured and "load_cpu_s" in enc and not self.cal.get("paper_shapes"):
            per = enc["worker_cpu_s_per_sample"] + enc["client_cpu_s_per_sample"]
            cpu = Fig(
                W * enc["load_cpu_s"] + N * per,
                MEASURED,
                "CPU seconds of the workers and the client (independent of other load)",
            ).to_dict()
        return {
            "cpu_s": cpu,
            "workers": W,
            "s_per_sample": t.to_dict(),
            "parts": {k: v.to_dict() for k, v in parts.items()},
            "startup_s": startup.to_dict(),
            "tasks_s": tasks,
            "finalize_s": finalize.to_dict(),
            "wall_s": wall,
            "device_hours": W * (startup.value + tasks) / 3600,
            "source": t.source,
            "memory": self._encode_memory(enc),
        }

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

    def _encoder_flops(self, enc: dict[str, Any]) -> tuple[float, str]:
        from gap3d.plan.models import analytic_encoder_cost, full_depth_flops

        total, notes = 0.0, []
        for role in ("prompt", "image"):
            if enc:
                f, note = full_depth_flops(enc[f"{role}_encoder"], enc[f"{role}_encoder"]["model"])
                total += f
                notes.append(f"{role} counted on its forward{', ' + note if note else ''}")
            else:
                c = analytic_encoder_cost(self.cfg, role)
                total += c["flops_per_sample"]
                notes.append(f"{role} counted on the architecture")
        return total, "; ".join(notes)

    def _encode_memory(self, enc: dict[str, Any]) -> dict[str, Any]:
        """Per encode worker: device memory (models + activations at the batch sizes) and host
        memory (the task's in-flight shard)."""
        from gap3d.plan.models import UnknownModelError, analytic_encoder_cost

        S = self.cfg.data.samples_per_shard
        lay = self.layout
        # The current encode task holds a shard's features as float32 while it encodes and
        # writes them (encode_samples -> shard_region), about three copies.
        per_sample_host = (
            3
            * 4
            * (lay.n_tokens * lay.channels + self.cfg.prompt_encoder.max_length * self.prompt_dim)
        )
        out: dict[str, Any] = {}
        if self.t.measured and enc and not self.cal.get("paper_shapes"):
            key = "worker_cuda_peak_allocated" if self.t.kind == "cuda" else "worker_peak_rss"
            out["device_peak"] = Fig(enc[key], MEASURED, "encode worker peak").to_dict()
        else:
            try:
                b = 0.0
                for role in ("prompt", "image"):
                    ecfg = getattr(self.cfg, f"{role}_encoder")
                    tokens = enc.get("prompt_encoder", {}).get("tokens_per_prompt") if enc else None
                    c = analytic_encoder_cost(self.cfg, role, int(tokens) if tokens else None)
                    b += c["weight_bytes"] + c["activation_bytes_per_sample"] * ecfg.batch_size
                out["device_peak"] = Fig(
                    b * ALLOCATOR_SLACK + CUDA_CONTEXT_BYTES,
                    ANALYTIC,
                    "weights + activations at the encoder batch sizes (counted), + allocator "
                    "slack and CUDA context (assumed)",
                ).to_dict()
            except UnknownModelError as e:
                out["device_peak"] = Fig(float("nan"), ANALYTIC, str(e)).to_dict()
        if enc:
            s_bench = enc["samples_per_shard"]
            extra = (S - s_bench) * per_sample_host
            out["host_peak"] = Fig(
                enc["worker_peak_rss"] + extra,
                MEASURED if S == s_bench else ANALYTIC,
                "worker resident memory measured at "
                f"{s_bench} samples/shard"
                + ("" if S == s_bench else f", + {S - s_bench} x {per_sample_host / 1e6:.1f} MB"),
            ).to_dict()
        else:
            out["host_peak"] = Fig(
                S * per_sample_host + 2.0e9,
                ANALYTIC,
                "a shard of float32 features x 3 + 2 GB of runtime (assumed)",
            ).to_dict()
        return out

    # ------------------------------------------------------------------ training
    def train_rows(self) -> tuple[int, int]:
        """(train, val) samples the trainer's split makes of the pairs: all of them are
        ``train`` samples, except the demo's held-out (shape, colour) combinations."""
        n = self.inp.pairs
        if self.cfg.data.source == "demo":
            n = max(2, round(n * (1 - self.cfg.data.demo.heldout_fraction)))
        n_val = val_rows(self.cfg, n)
        return n - n_val, n_val

    def steps(self) -> tuple[int, float]:
        n_train, _ = self.train_rows()
        G = self.cfg.train.batch_size * max(1, self.train_devices)
        if self.inp.epochs:
            steps = max(1, math.ceil(self.inp.epochs * n_train / G))
        else:
            steps = self.cfg.train.max_steps
        return steps, steps * G / max(1, n_train)

    def _flops_fit(self) -> tuple[float, float] | None:
        """``(a, b)`` with step seconds = a + b * FLOPs, from the calibration's step probes."""
        probes = [
            p
            for p in self.cal.get("train", {}).get("step_probes", [])
            if "measured" in p and not p["grad_ckpt"]
        ]
        if len(probes) >= 2:
            x = np.array([p["traced"]["flops"] for p in probes])
            y = np.array([p["measured"]["step_s"] for p in probes])
            if np.ptp(x) > 0:
                b, a = np.polyfit(x, y, 1)
                if b > 0:
                    return float(max(a, 0.0)), float(b)
        if probes:
            p = probes[0]
            return 0.0, p["measured"]["step_s"] / p["traced"]["flops"]
        return None

    def step_time(self, cfg: Gap3dConfig | None = None, grad_ckpt: bool | None = None) -> Fig:
        """Seconds per optimiser step on one device."""
        cfg = cfg or self.cfg
        case = self.case(cfg, grad_ckpt)
        tr = trace_train_step(case)
        run = self.cal.get("train", {}).get("run", {})
        fit = self._flops_fit()
        same = case == self.case(self.ref, False)
        if self._measured_train() and same and run.get("step_s"):
            return Fig(run["step_s"], MEASURED, "real trainer, this device")
        if self._measured_train() and fit is not None:
            ref = trace_train_step(self.case(self.ref, False))
            a, b = fit
            model = (a + b * tr["flops"]) / (a + b * ref["flops"])
            if run.get("step_s"):
                base, what = run["step_s"], "real trainer"
            else:
                base = a + b * ref["flops"]
                what = "step probe"
            note = f"{what}, this device" + ("" if same else ", scaled by traced FLOPs")
            return Fig(base * model, MEASURED, note)
        peak = self._peak_flops()
        compute = tr["flops"] / (peak * self.inp.mfu_train)
        bw = (self.t.spec.bandwidth_gbs * 1e9) if self.t.spec else 50e9
        opt = tr["params"] * OPT_BYTES_PER_PARAM / (bw * 0.8)
        data = self._data_time(cfg)
        t = compute + opt
        workers = cfg.train.num_workers
        t = t + data if workers == 0 else max(t, data / workers)
        return Fig(
            t,
            ANALYTIC,
            f"{tr['flops'] / 1e12:.1f} TFLOP/step (traced) / {peak / 1e12:.0f} TFLOP/s "
            f"{self._peak_note()} x {self.inp.mfu_train:.0%} (assumed) + optimiser/EMA at 80% "
            f"of memory bandwidth + data reads",
        )

    def _data_time(self, cfg: Gap3dConfig) -> float:
        st = self.storage()
        per = st["combos"][st["configured"]]["per_array"]
        b = sum(
            per.get(n, 0) for n in ("image_tokens", "image_scale", "prompt_latents", "prompt_mask")
        )
        rate, _ = self._disk_rate("read_mb_s")
        return cfg.train.batch_size * b / (rate * 1e6)

    def sample_time(self, cfg: Gap3dConfig | None = None) -> Fig:
        """Seconds of one guided Euler step at the validation batch size."""
        cfg = cfg or self.cfg
        case = dataclasses.replace(self.case(cfg, False), grad_ckpt=False)
        tr = trace_sample_step(case, cfg.eval.cfg_scale)
        probes = [
            p
            for p in self.cal.get("train", {}).get("step_probes", [])
            if "measured" in p and p["measured"].get("sample_step_s")
        ]
        if self._measured_train() and probes:
            p = min(probes, key=lambda p: abs(p["batch"] - case.batch))
            scale = tr["flops"] / p["traced_sample"]["flops"]
            return Fig(p["measured"]["sample_step_s"] * scale, MEASURED, "step probe, this device")
        peak = self._peak_flops()
        return Fig(
            tr["flops"] / (peak * self.inp.mfu_infer),
            ANALYTIC,
            f"{tr['flops'] / 1e12:.2f} TFLOP/step (traced) at {self.inp.mfu_infer:.0%} (assumed)",
        )

    def train(self) -> dict[str, Any]:
        """Training time: steps, validation, checkpoints, start-up; device hours."""
        cfg, tc = self.cfg, self.cfg.train
        steps, epochs = self.steps()
        K = max(1, self.train_devices)
        step = self.step_time()
        _, n_val = self.train_rows()
        n_val_runs = steps // tc.val_every_n_steps + (1 if steps % tc.val_every_n_steps else 0)
        rows = math.ceil(min(tc.val_samples, n_val) / K)
        tr_case = trace_train_step(self.case(cfg, False))
        ckpt_bytes = tr_case["weights"] + tr_case["optimizer"] + tr_case["ema"]
        n_periods = steps // tc.checkpoint_every_n_steps + (
            1 if steps % tc.checkpoint_every_n_steps else 0
        )
        run = self.cal.get("train", {}).get("run", {})
        if self._measured_train() and run.get("phases_measured"):
            per_row = run["val_s"] / max(1, run["val_runs"]) / max(1, run.get("val_rows", 1))
            scale = self.sample_time().value / max(
                1e-12, self.sample_time(self.ref).value
            )  # other batch/preset than measured
            val = Fig(
                n_val_runs * rows * per_row * scale, MEASURED, "real trainer's validation, per row"
            )
            ref_tr = trace_train_step(self.case(self.ref, False))
            ref_bytes = ref_tr["weights"] + ref_tr["optimizer"] + ref_tr["ema"]
            per_write = run["ckpt_s"] / max(1, run["ckpt_writes"]) * ckpt_bytes / ref_bytes
            writes = run["ckpt_writes"]  # files written per checkpoint period (step + last)
            ckpt = Fig(n_periods * writes * per_write, MEASURED, f"{writes} file(s) per period")
            startup = Fig(
                run["startup_s"]
                + max(0.0, run["first_step_s"] - run["step_s"])
                + run["teardown_s"]
                + run.get("process_overhead_s", 0.0),
                MEASURED,
                "process start to first step, first-step warm-up, export, process exit",
            )
        else:
            batches = math.ceil(rows / tc.batch_size) if rows else 0
            fwd = step.value / 3  # a forward pass is about a third of a training step
            val = Fig(
                n_val_runs * batches * (fwd + cfg.eval.steps * self.sample_time().value),
                ANALYTIC,
                f"{n_val_runs} runs x {batches} batch(es) x ({cfg.eval.steps} Euler steps + loss)",
            )
            rate, how = self._disk_rate("write_mb_s")
            ckpt = Fig(
                n_periods * 2 * ckpt_bytes / (rate * 1e6),
                ANALYTIC,
                f"{ckpt_bytes / 1e9:.1f} GB x 2 files per period at {rate:.0f} MB/s ({how})",
            )
            startup = Fig(STARTUP_S, ANALYTIC, "process start, data module, first step (assumed)")
        compute = steps * step.value
        wall = startup.value + compute + val.value + ckpt.value
        cpu = None
        same = self.case(cfg, False) == self.case(self.ref, False)
        if self._measured_train() and same and run.get("step_s_cpu") is not None:
            # the same sum in the process's CPU seconds (what one torch thread costs
            # whatever else the machine runs)
            c = run
            val_rows_probe = max(1, c.get("val_rows", 1))
            cpu = Fig(
                c["startup_s_cpu"]
                + max(0.0, c["first_step_s_cpu"] - c["step_s_cpu"])
                + c["teardown_s_cpu"]
                + c["process_overhead_s_cpu"]
                + steps * c["step_s_cpu"]
                + n_val_runs * rows * c["val_s_cpu"] / max(1, c["val_runs"]) / val_rows_probe
                + n_periods * c["ckpt_s_cpu"],
                MEASURED,
                "CPU seconds of the training process (independent of other load)",
            ).to_dict()
        return {
            "cpu_s": cpu,
            "steps": steps,
            "epochs": epochs,
            "devices": K,
            "global_batch": tc.batch_size * K,
            "step_s": step.to_dict(),
            "steps_s": compute,
            "validation_s": val.to_dict(),
            "validation_runs": n_val_runs,
            "checkpoint_s": ckpt.to_dict(),
            "checkpoint_bytes": ckpt_bytes,
            "startup_s": startup.to_dict(),
            "wall_s": wall,
            "device_hours": K * wall / 3600,
            "source": step.source,
        }

    # ------------------------------------------------------------------ memory
    def memory(
        self, cfg: Gap3dConfig | None = None, grad_ckpt: bool | None = None
    ) -> dict[str, Any]:
        """Per-device training memory: parts (traced) and the peak, and whether it fits."""
        cfg = cfg or self.cfg
        case = self.case(cfg, grad_ckpt)
        tr = trace_train_step(case)
        parts = {
            "weights": tr["weights"],
            "gradients": tr["grads"],
            "optimizer": tr["optimizer"],
            "ema": tr["ema"],
            "activations": tr["saved"],
        }
        run = self.cal.get("train", {}).get("run", {})
        peak: Fig | None = None
        if self._measured_train():
            ref = trace_train_step(self.case(self.ref, False))
            key = "cuda_peak_allocated" if self.t.kind == "cuda" else "peak_rss"
            measured = run.get(key)
            if measured:
                base = measured - ref["peak"]  # the process's own memory besides tensors
                what = "real trainer"
            else:
                probe = self._probe_for(case) or self._probe_for(self.case(self.ref, False))
                measured = probe["measured"].get(key) if probe else None
                base = (measured - probe["traced"]["peak"]) if measured else None
                what = "step probe"
            if measured is not None and base is not None:
                same = case == self.case(self.ref, False)
                peak = Fig(
                    base + tr["peak"],
                    MEASURED,
                    f"{what} peak {'resident' if self.t.kind == 'cpu' else 'CUDA'} memory"
                    + ("" if same else " + traced difference to this setting"),
                )
        if peak is None:
            ratio = self._traced_ratio()
            peak = Fig(
                tr["peak"] * ratio + (CUDA_CONTEXT_BYTES if self.t.kind == "cuda" else 0.0),
                ANALYTIC,
                "traced live tensors"
                + (
                    f" x {ratio:.2f} (measured/traced on the calibration device)"
                    if ratio != ALLOCATOR_SLACK
                    else " x allocator slack"
                )
                + (" + CUDA context (assumed)" if self.t.kind == "cuda" else ""),
            )
        fits = peak.value <= self.t.memory_bytes
        return {
            "parts": parts,
            "traced_peak": tr["peak"],
            "peak": peak.to_dict(),
            "device_memory": self.t.memory_bytes,
            "fits": bool(fits),
            "grad_ckpt": case.grad_ckpt,
            "batch": case.batch,
            "params": tr["params"],
        }

    def _probe_for(self, case: AlignerCase) -> dict[str, Any] | None:
        for p in self.cal.get("train", {}).get("step_probes", []):
            if (
                "measured" in p
                and p["batch"] == case.batch
                and p["grad_ckpt"] == case.grad_ckpt
                and p["traced"]["params"] == trace_train_step(case)["params"]
            ):
                return p
        return None

    def _traced_ratio(self) -> float:
        """Measured/traced peak of the calibration's step probes on a GPU (allocator slack)."""
        ratios = [
            p["measured"]["cuda_peak_reserved"] / p["traced"]["peak"]
            for p in self.cal.get("train", {}).get("step_probes", [])
            if "measured" in p and p["measured"].get("cuda_peak_reserved")
        ]
        return float(np.mean(ratios)) if ratios and self.t.kind == "cuda" else ALLOCATOR_SLACK
