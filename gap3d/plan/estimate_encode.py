"""Encode-stage estimates of :class:`gap3d.plan.estimate.Planner` (a mixin): time per sample
split into host work and the encoders' forward, wall time on the workers, device-hours, and
per-worker device and host memory."""

from __future__ import annotations

from typing import Any

from gap3d.plan.figures import (
    ALLOCATOR_SLACK,
    ANALYTIC,
    CUDA_CONTEXT_BYTES,
    HOST_S_PER_SAMPLE,
    MEASURED,
    STARTUP_S,
    Fig,
    calib_device,
)
from gap3d.store.manifest import TARGET_FILE_BYTES

# the writer's buffer: one row file of stored rows (the default file size of the store)
ROW_FILE_BYTES = TARGET_FILE_BYTES


class EncodeEstimates:
    """Needs ``self.cfg``, ``self.cal``, ``self.t``, ``self.inp``, ``self.layout``,
    ``self.prompt_dim``, ``workers``, ``storage()``, ``_same_encoders()``, ``_peak_flops()``,
    ``_peak_note()``, ``_disk_rate()`` (see ``Planner``)."""

    cfg: Any
    cal: dict[str, Any]
    t: Any
    inp: Any
    layout: Any
    prompt_dim: int

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
            finalize = Fig(enc.get("finalize_s_per_sample", 0.0) * N, MEASURED, "statistics pass")
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
                # Wall seconds on a busy calibration machine overstate the work: scale by the
                # tasks' CPU/wall ratio (CPU seconds = wall seconds of an idle core).
                busy = min(1.0, enc.get("worker_cpu_s_per_sample", 0.0) / enc["task_s_per_sample"])
                busy = busy if busy > 0 else 1.0
                host = Fig(
                    (enc["host_s_per_sample"] + pre) * busy,
                    MEASURED,
                    "decode, preprocess, write: CPU seconds on the calibration machine "
                    f"({calib_device(self.cal)})",
                )
            else:
                host = Fig(HOST_S_PER_SAMPLE, ANALYTIC, "decode, resize, write (assumed)")
            parts["host"] = host
            t = Fig(host.value + dev, ANALYTIC, "host work + device forward, sequential per task")
            startup = Fig(STARTUP_S, ANALYTIC, "cluster start + model load (assumed)")
            # statistics are merged from the moments each shard commit records: no pass
            finalize = Fig(0.0, ANALYTIC, "merged from per-shard moments (no pass)")
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

        lay = self.layout
        # A streaming encode task holds a few batches of float32 features (the one being
        # encoded, the prefetched one, the one being written) and one row file of stored rows,
        # never the whole shard: its memory does not grow with samples_per_shard
        # (benchmarks/scale.py measured 1.05x from 256 to 2048 samples at the paper layout).
        per_sample_f32 = 4 * (
            lay.n_tokens * lay.channels + self.cfg.prompt_encoder.max_length * self.prompt_dim
        )
        batch = max(self.cfg.prompt_encoder.batch_size, self.cfg.image_encoder.batch_size)
        buffers = 3 * batch * per_sample_f32 + ROW_FILE_BYTES
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
            out["host_peak"] = Fig(
                enc["worker_peak_rss"],
                MEASURED,
                f"worker resident memory measured at {s_bench} samples/shard (a streaming "
                "encode task's memory does not depend on the shard size)",
            ).to_dict()
        else:
            out["host_peak"] = Fig(
                buffers + 2.0e9,
                ANALYTIC,
                "3 batches of float32 features + one row file + 2 GB of runtime (assumed)",
            ).to_dict()
        return out
