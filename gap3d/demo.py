"""``gap3d demo``: the main job on the embedded default, end to end, with a summary table.

demo-data -> download (img2dataset, loopback server) -> cache (frozen encoders, Zarr) ->
train (Lightning, cached tensors only; exports the EMA aligner) -> eval (ours vs baselines) ->
generate a few prompts (retrieval generator on the CPU).

Each stage is the same function the individual command runs, so the demo is also a smoke test
of the CLI. Every stage skips work that is already done, so re-running the demo resumes it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path
from typing import Any

from gap3d.config import Gap3dConfig

DEFAULT_PROMPTS = [
    "a red cube",
    "a small blue sphere",
    "a green torus seen from above",
]


def _stage(target: str, cfg: Gap3dConfig, **flags: Any) -> int:
    """Call ``module:function`` (a command's ``cli_main``) with an argparse-like namespace."""
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(cfg, argparse.Namespace(**flags)) or 0)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _summary(cfg: Gap3dConfig, timings: dict[str, float], generated: list[dict[str, Any]]) -> str:
    lines = [
        "",
        "=" * 78,
        f"gap3d demo summary  (config: {cfg.name}, workdir: {cfg.workdir})",
        "=" * 78,
    ]
    lines.append("wall time per stage:")
    for name, secs in timings.items():
        lines.append(f"  {name:<10} {secs:8.1f} s")
    lines.append(f"  {'total':<10} {sum(timings.values()):8.1f} s")
    metrics_md = cfg.eval_dir / "metrics.md"
    if metrics_md.exists():
        lines += ["", f"evaluation ({metrics_md}):", metrics_md.read_text().rstrip()]
    if generated:
        lines += ["", "generated prompts:"]
        for g in generated:
            best = g.get("best") or {}
            lines.append(
                f"  {g.get('prompt', '?')!r:<40} -> {best.get('asset_id', '-')}"
                f" ({best.get('shape', '?')}, {best.get('colour', '?')})  [{g.get('out_dir', '')}]"
            )
    lines.append("=" * 78)
    return "\n".join(lines)


def run_demo(cfg: Gap3dConfig, prompts: list[str] | None = None) -> dict[str, Any]:
    """Run every stage; return timings, metrics and generation results."""
    prompts = prompts or DEFAULT_PROMPTS
    timings: dict[str, float] = {}

    def timed(name: str, target: str, **flags: Any) -> None:
        print(f"\n>>> [{name}] {target.split(':')[0]}", flush=True)
        t0 = time.perf_counter()
        rc = _stage(target, cfg, **flags)
        timings[name] = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(
                f"stage '{name}' failed (exit {rc}); fix the cause and re-run "
                "`gap3d demo` — finished stages are skipped"
            )

    timed("demo-data", "gap3d.pipeline.demo_data:cli_main")
    timed("download", "gap3d.pipeline.download:cli_main", scheduler=None)
    timed("cache", "gap3d.pipeline.encode:cli_main", scheduler=None)
    resume = "last" if (cfg.run_dir / "checkpoints" / "last.ckpt").exists() else None
    timed("train", "gap3d.trainer.train:cli_main", resume=resume)
    timed("eval", "gap3d.evaluation.evaluate:cli_main", aligner=None, out=None)

    generated: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        out = cfg.work / "generate" / f"prompt-{i}"
        rc = _stage(
            "gap3d.inference.generate:cli_main",
            cfg,
            prompt=prompt,
            image=None,
            out=str(out),
            aligner=None,
            generator=None,
            n_samples=None,
            seed=None,
            steps=None,
            cfg_scale=None,
        )
        if rc != 0:
            raise RuntimeError(f"generate failed for prompt {prompt!r}")
        result = _read_json(out / "result.json")
        result.setdefault("prompt", prompt)
        result["out_dir"] = str(out)
        generated.append(result)
    timings["generate"] = time.perf_counter() - t0

    summary = _summary(cfg, timings, generated)
    print(summary)
    report = {
        "config": cfg.name,
        "timings_s": timings,
        "total_s": sum(timings.values()),
        "metrics": _read_json(cfg.eval_dir / "metrics.json"),
        "generated": generated,
    }
    (cfg.work / "demo_summary.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    run_demo(cfg, getattr(args, "prompts", None) or None)
    return 0
