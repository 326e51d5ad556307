"""Training estimates of :class:`gap3d.plan.estimate.Planner` (a mixin): steps, step time,
validation, checkpoints, start-up, device-hours, and per-device memory with and without
gradient checkpointing."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from gap3d.config import Gap3dConfig
from gap3d.plan.figures import (
    ALLOCATOR_SLACK,
    ANALYTIC,
    CUDA_CONTEXT_BYTES,
    MEASURED,
    OPT_BYTES_PER_PARAM,
    STARTUP_S,
    Fig,
    val_rows,
)
from gap3d.plan.trace import AlignerCase, trace_sample_step, trace_train_step


class TrainEstimates:
    """Needs ``self.cfg``, ``self.ref``, ``self.cal``, ``self.t``, ``self.inp``, ``case()``,
    ``train_devices``, ``storage()``, ``_measured_train()``, ``_peak_flops()``,
    ``_peak_note()``, ``_disk_rate()`` (see ``Planner``)."""

    cfg: Any
    ref: Any
    cal: dict[str, Any]
    t: Any
    inp: Any

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
                cuda = self.t.kind == "cuda"
                peak = Fig(
                    # allocated CUDA memory leaves out the context the device also holds
                    base + tr["peak"] + (CUDA_CONTEXT_BYTES if cuda else 0.0),
                    MEASURED,
                    f"{what} peak {'CUDA allocated (+ context, assumed)' if cuda else 'resident'}"
                    " memory" + ("" if same else " + traced difference to this setting"),
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
