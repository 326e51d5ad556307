"""Model FLOPs utilisation (MFU) of the demo training step; part of ``benchmarks/train.py``.

MFU = analytic matmul FLOPs per step (``gap3d.trainer.flops``) / measured step time / the
matmul peak of this machine measured in the same run (a 2048 x 2048 matmul with the same
threads), for the precision the step actually uses. The step is the trainer's own: normalise
the tokens, flow-matching loss (``FlowMatching.loss``), backward, gradient clipping, the
fused AdamW step and the EMA update, on a demo-layout batch.

Variants (each measured alternately with the others, so a change of machine load hits all):

* ``fp32``: eager float32, the default;
* ``fp32+compile``: the net under ``torch.compile`` (``--compile``; compile time reported);
* ``bf16``: bf16 autocast. Run only where bf16 matmuls are measured faster than fp32
  (``--bf16`` forces it), else reported as skipped with the measured rates.

Also the time of a real ``gap3d train`` (Lightning, data loading, logging) per step, to show
the overhead around the step. Run alone: ``.venv/bin/python benchmarks/train_step.py``
(writes ``benchmarks/results/train_step.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results"


def matmul_peak(threads: int, n: int = 2048) -> dict[str, float]:
    """GFLOP/s of an n x n matmul in fp32 and bf16 (bf16 stops early where it is emulated)."""
    import torch

    from gap3d.trainer.speed import _rate

    torch.set_num_threads(threads)
    fp32 = _rate(torch.float32, n, budget_s=2.0)
    bf16 = _rate(torch.bfloat16, n, budget_s=2.0, slow_after_s=4 * 2.0 * n**3 / fp32 / 1e9)
    return {"n": n, "fp32_gflops": fp32, "bf16_gflops": bf16, "bf16_speedup": bf16 / fp32}


def _module(batch: int, seed: int = 0) -> tuple[Any, dict[str, Any], Any]:
    """The demo-preset AlignerModule, a synthetic demo-layout batch, and the config."""
    import torch

    from gap3d.config import load_config
    from gap3d.layout import TokenLayout
    from gap3d.trainer.module import AlignerModule

    cfg = load_config("demo")
    layout = TokenLayout(1, 0, 7, 7, 1280)
    length, dim = cfg.prompt_encoder.max_length, 384
    ch = layout.channels
    stats = {k: np.zeros(ch) for k in ("cls_mean", "patch_mean")}
    stats.update({k: np.ones(ch) for k in ("cls_std", "patch_std")})
    info = {
        "layout": layout.to_dict(),
        "prompt_dim": dim,
        "prompt_max_length": length,
        "manifest": {},
        "store_path": "",
    }
    torch.manual_seed(seed)
    module = AlignerModule(cfg.to_dict(), info, "", stats=stats)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, length + 1, (batch,), generator=g)
    data = {
        # sparse non-negative like EfficientNet's ReLU6 grid
        "image_tokens": torch.relu(torch.randn(batch, layout.n_tokens, ch, generator=g) - 1.0),
        "prompt_latents": torch.randn(batch, length, dim, generator=g),
        "prompt_mask": torch.arange(length)[None] < lengths[:, None],
    }
    return module, data, cfg


def _stepper(module: Any, data: dict[str, Any], cfg: Any, variant: str) -> Any:
    """One training step of ``module`` per call, as the trainer runs it."""
    import torch

    from gap3d.trainer.speed import make_adamw

    opt = make_adamw(module.net.parameters(), cfg.train.lr, cfg.train.weight_decay)
    net = torch.compile(module.net, dynamic=False) if variant == "fp32+compile" else None
    bf16 = variant == "bf16"

    def step(i: int) -> float:
        x0 = module.normalizer.normalize(data["image_tokens"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = module.flow.loss(
                x0,
                data["prompt_latents"],
                data["prompt_mask"],
                generator=torch.Generator().manual_seed(i),
                net=net,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.net.parameters(), cfg.train.grad_clip)
        opt.step()
        module.ema.update(module.net)
        return float(loss.detach())

    return step


def step_mfu(
    threads: int, batches: list[int], steps: int, compile_: bool, force_bf16: bool
) -> dict[str, Any]:
    """Step time and MFU per (batch, variant); the variants alternate step by step."""
    import torch

    from gap3d.trainer.flops import aligner_flops
    from gap3d.trainer.model import resolve_aligner_size

    torch.set_num_threads(threads)
    peak = matmul_peak(threads)
    variants = ["fp32"] + (["fp32+compile"] if compile_ else [])
    bf16_note = None
    if force_bf16 or peak["bf16_speedup"] >= 1.0:
        variants.append("bf16")
    else:
        bf16_note = (
            f"skipped: bf16 matmul {peak['bf16_gflops']:.1f} GFLOP/s vs fp32 "
            f"{peak['fp32_gflops']:.1f} here ({torch.backends.cpu.get_cpu_capability()}, no "
            "bf16 matrix units): train.precision=auto stays on 32-true"
        )
    out: dict[str, Any] = {"peak": peak, "threads": threads, "rows": [], "bf16": bf16_note}
    for batch in batches:
        runs: dict[str, Any] = {}
        first: dict[str, float] = {}
        ref_module, data, cfg = _module(batch)
        for v in variants:
            module, _, _ = _module(batch)
            runs[v] = _stepper(module, data, cfg, v)
            t0 = time.perf_counter()
            runs[v](0)  # warm-up (the compile, for the compiled variant)
            first[v] = time.perf_counter() - t0
        times: dict[str, list[float]] = {v: [] for v in variants}
        for i in range(1, steps + 1):
            for v in variants:
                t0 = time.perf_counter()
                runs[v](i)
                times[v].append(time.perf_counter() - t0)
        a = cfg.aligner
        flops = aligner_flops(
            ref_module.layout,
            cfg.prompt_encoder.max_length,
            ref_module.prompt_dim,
            resolve_aligner_size(a),
            a.n_queries,
            a.resampler_depth,
        ).per_step(batch)
        for v in variants:
            best = min(times[v])
            p = peak["bf16_gflops"] if v == "bf16" else peak["fp32_gflops"]
            out["rows"].append(
                {
                    "batch": batch,
                    "variant": v,
                    "gflop_per_step": flops / 1e9,
                    "step_s": best,
                    "step_s_median": float(np.median(times[v])),
                    "first_step_s": first[v],
                    "samples_per_s": batch / best,
                    "achieved_gflops": flops / best / 1e9,
                    "peak_gflops": p,
                    "mfu": flops / best / 1e9 / p,
                }
            )
    return out


def lightning_step(steps: int, threads: int) -> dict[str, Any]:
    """Seconds per step of a real ``gap3d.trainer.train`` run (no validation) on a synthetic
    demo-layout store, beside the bare step: the overhead of Lightning + data loading."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from gap3d.config import load_config
    from gap3d.layout import TokenLayout
    from gap3d.store import FeatureStore, ShardData
    from gap3d.store.manifest import StoreSpec
    from gap3d.trainer.train import train

    torch.set_num_threads(threads)
    root = Path(tempfile.mkdtemp(prefix="gap3d-bench-step-"))
    per = 256  # 2 shards: 512 samples
    layout = TokenLayout(1, 0, 7, 7, 1280)
    spec = StoreSpec(
        layout=layout, prompt_dim=384, prompt_max_length=32, n_shards=2, samples_per_shard=per
    )
    store = FeatureStore.create(root / "features.zarr", spec)
    rng = np.random.default_rng(0)
    for s in range(2):
        store.write_shard(
            s,
            ShardData(
                image_tokens=np.maximum(rng.standard_normal((per, 50, 1280)) - 1, 0).astype(
                    np.float16
                ),
                prompt_latents=rng.standard_normal((per, 32, 384)).astype(np.float16),
                prompt_mask=np.arange(32)[None] < rng.integers(4, 33, per)[:, None],
                caption=["x"] * per,
                key=[f"{s}-{i}" for i in range(per)],
                url=[""] * per,
                split=["train"] * per,
                meta=[{}] * per,
                reason=[""] * per,
                thumbnail=np.zeros((per, 64, 64, 3), np.uint8),
            ),
        )
    # statistics come from the moments each shard commit recorded: nothing to finalise
    cfg = load_config(
        "demo",
        [
            f"workdir={root}",
            f"train.max_steps={steps}",
            "train.warmup_steps=1",
            f"train.val_every_n_steps={steps * 10}",
            f"train.checkpoint_every_n_steps={steps * 10}",
            "train.precision=32-true",
        ],
    )
    lines: list[float] = []

    class Clock(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            lines.append(time.perf_counter())

    t0 = time.perf_counter()
    train(cfg, export=False, callbacks=[Clock()])
    total = time.perf_counter() - t0
    gaps = np.diff(lines[2:]) if len(lines) > 3 else np.array([float("nan")])
    return {
        "steps": steps,
        "step_s": float(np.min(gaps)),
        "step_s_median": float(np.median(gaps)),
        "wall_s": total,
    }


def markdown(res: dict[str, Any]) -> str:
    p = res["peak"]
    lines = [
        "# Training step: model FLOPs utilisation (demo preset)",
        "",
        f"Machine: {res['machine']['cpus']} CPUs, {res['threads']} threads, load average "
        f"{res['machine']['load_avg_at_start'][0]:.1f} at start / "
        f"{res['machine']['load_avg_at_end'][0]:.1f} at end. Matmul peak measured in this run "
        f"({p['n']}x{p['n']}): fp32 **{p['fp32_gflops']:.1f}** GFLOP/s, bf16 "
        f"**{p['bf16_gflops']:.1f}** GFLOP/s ({p['bf16_speedup']:.2f}x).",
        "",
        "| batch | variant | GFLOP/step | step (min) | step (median) | samples/s | achieved "
        "GFLOP/s | MFU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['batch']} | {r['variant']} | {r['gflop_per_step']:.1f} | {r['step_s']:.3f} s "
            f"| {r['step_s_median']:.3f} s | {r['samples_per_s']:.1f} | "
            f"{r['achieved_gflops']:.1f} | **{r['mfu']:.0%}** |"
        )
    if res.get("bf16"):
        lines += ["", f"bf16: {res['bf16']}"]
    comp = [r for r in res["rows"] if r["variant"] == "fp32+compile"]
    if comp:
        lines += ["", f"torch.compile: first step (compile) {comp[0]['first_step_s']:.0f} s."]
    lt = res.get("lightning")
    if lt:
        lines += [
            "",
            f"A real `gap3d train` (Lightning, store reads, logging; batch 32, no validation): "
            f"{lt['step_s']:.3f} s/step (min), {lt['step_s_median']:.3f} s (median).",
        ]
    lines += ["", "Command: `" + res["command"] + "`", ""]
    return "\n".join(lines)


def run(
    threads: int | None = None,
    batches: tuple[int, ...] = (32, 64),
    steps: int = 6,
    compile_: bool = False,
    force_bf16: bool = False,
    lightning_steps: int = 30,
    command: str = "",
) -> dict[str, Any]:
    """Everything above, each part in a fresh spawned process; returns the result dict."""
    import concurrent.futures as cf
    import multiprocessing as mp

    threads = threads or max(1, min(2, os.cpu_count() or 1))
    ctx = mp.get_context("spawn")
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        res = ex.submit(step_mfu, threads, list(batches), steps, compile_, force_bf16).result()
    if lightning_steps:
        with cf.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            res["lightning"] = ex.submit(lightning_step, lightning_steps, threads).result()
    machine["load_avg_at_end"] = os.getloadavg()
    res["machine"] = machine
    res["command"] = command or "python benchmarks/train_step.py"
    for r in res["rows"]:
        print(
            f"  batch {r['batch']:3d} {r['variant']:13s} {r['step_s']:.3f} s/step "
            f"({r['samples_per_s']:.1f} samples/s) {r['achieved_gflops']:.1f} GFLOP/s of "
            f"{r['peak_gflops']:.1f}: MFU {r['mfu']:.0%}",
            flush=True,
        )
    if res.get("bf16"):
        print(f"  bf16 {res['bf16']}")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--bf16", action="store_true", help="time bf16 even where it is slower")
    p.add_argument("--lightning-steps", type=int, default=30, help="0: skip the Lightning run")
    p.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    a = p.parse_args()
    cmd = "python benchmarks/train_step.py " + " ".join(
        x
        for x in (
            f"--batch {' '.join(map(str, a.batch))}",
            f"--steps {a.steps}",
            "--compile" if a.compile else "",
            "--bf16" if a.bf16 else "",
        )
        if x
    )
    res = run(a.threads, tuple(a.batch), a.steps, a.compile, a.bf16, a.lightning_steps, cmd)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    a.out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {a.out} and {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
