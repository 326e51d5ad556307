"""``gap3d bench``, training part: the aligner measured in processes of their own.

* ``train_step`` probes (``gap3d/plan/probes.py``) at the config's batch size, half of it, and
  with gradient checkpointing: step time, optimiser share, peak memory, one guided Euler step.
  Each comes with the fake-tensor trace of the same case (``gap3d/plan/trace.py``) so the
  calibration records measured and traced memory side by side.
* one ``train_run`` probe: the real ``gap3d train`` code for a few steps on the bench store,
  timed by phase (start-up, steps, validation, checkpoint, export) - what a plan of this very
  config on this machine uses directly.

A probe whose traced peak would not fit in the memory available now is skipped with a note
instead of taking the machine down.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from gap3d.config import AlignerConfig, Gap3dConfig
from gap3d.layout import TokenLayout
from gap3d.plan.probes import ProbeError, run_probe
from gap3d.plan.trace import AlignerCase, trace_sample_step, trace_train_step


def plan_precision(precision: str, device_kind: str) -> str:
    """``train.precision`` as the trainer resolves it (``auto``: bf16 on GPUs, fp32 on CPUs)."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if device_kind == "cuda" else "32-true"


def _available_bytes() -> float:
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        return float("inf")


def step_case(
    layout: TokenLayout,
    prompt_len: int,
    prompt_dim: int,
    aligner: AlignerConfig,
    batch: int,
    grad_ckpt: bool,
    precision: str,
) -> AlignerCase:
    return AlignerCase.make(layout, prompt_len, prompt_dim, aligner, batch, grad_ckpt, precision)


def run_step_probes(
    cases: list[tuple[str, AlignerCase]],
    device: str,
    workdir: Path,
    say: Any,
    sample_steps: int = 2,
    cfg_scale: float = 3.0,
    steps: int = 2,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """One ``train_step`` probe per ``(tag, case)``; traced figures recorded alongside."""
    out = []
    for tag, case in cases:
        traced = trace_train_step(case)
        sample = trace_sample_step(case, cfg_scale)
        rec: dict[str, Any] = {
            "tag": tag,
            "aligner": dataclasses.asdict(case.aligner_cfg()),
            "layout": TokenLayout(*case.layout).to_dict(),
            "batch": case.batch,
            "grad_ckpt": case.grad_ckpt,
            "precision": case.precision,
            "traced": traced,
            "traced_sample": sample,
        }
        need = traced["peak"] * 1.5 + 1.5e9  # tensors + allocator slack + the interpreter
        if device == "cpu" and need > _available_bytes() * 0.8:
            rec["skipped"] = (
                f"needs ~{need / 1e9:.1f} GB, {_available_bytes() / 1e9:.1f} GB available"
            )
            say(f"train    step probe {tag}: skipped ({rec['skipped']})")
            out.append(rec)
            continue
        payload = {
            "tag": f"step-{tag}",
            "layout": rec["layout"],
            "prompt_len": case.prompt_len,
            "prompt_dim": case.prompt_dim,
            "aligner": rec["aligner"],
            "batch": case.batch,
            "grad_ckpt": case.grad_ckpt,
            "precision": case.precision,
            "device": device,
            "steps": steps,
            "sample_steps": sample_steps,
            "cfg_scale": cfg_scale,
            "torch_threads": threads,
        }
        try:
            rec["measured"] = run_probe("train_step", payload, workdir)
        except ProbeError as e:
            rec["error"] = str(e)
            say(f"train    step probe {tag}: FAILED (see {workdir})")
            out.append(rec)
            continue
        m = rec["measured"]
        say(
            f"train    step probe {tag}: {m['step_s']:.3f} s/step, "
            f"peak {(m.get('cuda_peak_allocated') or m['peak_rss']) / 1e9:.2f} GB "
            f"(traced {traced['peak'] / 1e9:.2f} GB)"
        )
        out.append(rec)
    return out


def default_step_cases(
    cfg: Gap3dConfig, layout: TokenLayout, prompt_dim: int, precision: str
) -> list[tuple[str, AlignerCase]]:
    """The config's aligner at its batch size, half of it, and with checkpointing."""
    B, L = cfg.train.batch_size, cfg.prompt_encoder.max_length
    cases = [("config", step_case(layout, L, prompt_dim, cfg.aligner, B, False, precision))]
    if B > 1:
        half = max(1, B // 2)
        cases.append(
            ("half", step_case(layout, L, prompt_dim, cfg.aligner, half, False, precision))
        )
    cases.append(("ckpt", step_case(layout, L, prompt_dim, cfg.aligner, B, True, precision)))
    return cases


def paper_step_cases(
    cfg: Gap3dConfig, layout: TokenLayout, prompt_dim: int, precision: str
) -> list[tuple[str, AlignerCase]]:
    """``small`` and ``base`` at the paper layout, batch 1 (+ ``base`` checkpointed)."""
    L = cfg.prompt_encoder.max_length
    out = []
    for preset, ckpts in (("small", (False,)), ("base", (False, True))):
        a = dataclasses.replace(
            cfg.aligner, preset=preset, width=None, depth=None, heads=None, mlp_ratio=None
        )
        for ck in ckpts:
            tag = f"{preset}{'-ckpt' if ck else ''}"
            out.append((tag, step_case(layout, L, prompt_dim, a, 1, ck, precision)))
    return out


def train_run_config(cfg: Gap3dConfig, workdir: Path, steps: int) -> dict[str, Any]:
    """The config for the ``train_run`` probe: the user's, on the bench store, ``steps`` long,
    with exactly one validation and one checkpoint (at the end)."""
    d = copy.deepcopy(cfg.to_dict())
    t = d["train"]
    t.update(
        run_dir=str(workdir / "train"),
        max_steps=steps,
        warmup_steps=min(t["warmup_steps"], steps - 1),
        val_every_n_steps=steps,
        checkpoint_every_n_steps=steps,
        log_every_n_steps=min(t["log_every_n_steps"], steps),
    )
    d["store"]["path"] = str(cfg.store_path)
    d["workdir"] = str(workdir)
    return d


def _phases(r: dict[str, Any], i: int) -> dict[str, Any]:
    """Phase durations of a ``train_run`` probe from its marks (``i``: 0 wall, 1 CPU)."""
    m = r["marks"]
    ends = [e[i] for e in m["step_end"]]
    # Steady steps: intervals between step ends, except the last one, which holds the
    # final checkpoint write (timed on its own); the first step is reported apart.
    steady = [b - a for a, b in zip(ends[:-2], ends[1:-1], strict=True)]
    total = r["process_wall_s"] if i == 0 else r["process_cpu_s"]
    return {
        "startup_s": m["fit_start"][i],
        "first_step_s": ends[0] - m["fit_start"][i],
        "step_s": sum(steady) / len(steady) if steady else ends[-1] - ends[0],
        "val_s": sum(b[i] - a[i] for a, b in m["val"]),
        "val_runs": len(m["val"]),
        "ckpt_s": sum(b[i] - a[i] for a, b in m["ckpt"]),
        "ckpt_writes": len(m["ckpt"]),
        "teardown_s": r["done"][i] - m.get("fit_end", r["done"])[i],
        # interpreter start before the probe's clock and exit after it (seconds for a
        # process that imported torch, Lightning and TensorBoard)
        "process_overhead_s": max(0.0, total - r["done"][i]),
    }


def run_train_probe(
    cfg: Gap3dConfig, workdir: Path, steps: int, say: Any, threads: int | None = None
) -> dict[str, Any]:
    """The real trainer for ``steps`` steps; per-phase seconds and peak memory."""
    import shutil

    shutil.rmtree(workdir / "train", ignore_errors=True)
    payload = {
        "tag": "train-run",
        "config": train_run_config(cfg, workdir, steps),
        "torch_threads": threads,
        "export": True,
    }
    r = run_probe("train_run", payload, workdir)
    from gap3d.plan.figures import val_rows
    from gap3d.store import FeatureStore

    n_train = len(FeatureStore.open(cfg.store_path).indices(split="train"))
    out: dict[str, Any] = {
        "val_rows": min(cfg.train.val_samples, val_rows(cfg, n_train)),
        "steps": r["steps"],
        "wall_s": r["process_wall_s"],
        "cpu_s": r["process_cpu_s"],
        "train_wall_s": r["wall_s"],
        "peak_rss": r["peak_rss"],
        "cuda_peak_allocated": r.get("cuda_peak_allocated"),
        "batch_size": cfg.train.batch_size,
        "phases_measured": bool(r["hooked"] and r["marks"].get("step_end")),
    }
    if out["phases_measured"]:
        # Each phase in wall seconds and in CPU seconds of the process (the latter does not
        # depend on what else the machine is running: one torch thread makes CPU time the
        # wall time of an otherwise idle machine).
        for i, suffix in ((0, ""), (1, "_cpu")):
            out.update({k + suffix: v for k, v in _phases(r, i).items()})
        say(
            f"train    real trainer: start-up {out['startup_s']:.1f} s, "
            f"{out['step_s']:.3f} s/step, validation {out['val_s']:.1f} s, checkpoint "
            f"{out['ckpt_s']:.2f} s, peak {out['peak_rss'] / 1e9:.2f} GB"
        )
    return out
