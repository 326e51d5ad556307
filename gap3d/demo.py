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
import os
import resource
import time
from pathlib import Path
from typing import Any

from gap3d.config import Gap3dConfig

DEFAULT_PROMPTS = [
    "a red cube",
    "a small blue sphere",
    "a green torus seen from above",
    "an azure doughnut",
]

# The targets for the embedded demo on a 2-core CPU (README "Run the embedded demo").
TARGETS = {
    "total_s": 12 * 60,
    "heldout_in_vocabulary": 0.70,
    "new_words_seen": 0.90,
    "new_words_heldout": 0.60,
}


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


def headline(metrics: dict[str, Any], total_s: float) -> dict[str, Any]:
    """The demo's headline figures (ours) beside the targets in :data:`TARGETS`."""
    demo = (metrics.get("demo_accuracy") or {}).get("ours") or {}
    novel = ((metrics.get("novel_words") or {}).get("methods") or {}).get("ours", {}).get("all", {})

    def get(d: dict[str, Any], g: str) -> float | None:
        return d.get(g, {}).get("shape_colour")

    return {
        "total_s": total_s,
        "seen_in_vocabulary": get(demo, "val"),
        "heldout_in_vocabulary": get(demo, "heldout"),
        "new_words_seen": get(novel, "seen"),
        "new_words_heldout": get(novel, "heldout"),
    }


def _headline_lines(h: dict[str, Any]) -> list[str]:
    def row(name: str, key: str, fmt: str, better: str) -> str:
        v, target = h.get(key), TARGETS.get(key)
        if v is None:
            return f"  {name:<44} {'n/a':>8}"
        ok = (
            ""
            if target is None
            else ("  ok" if (v <= target if better == "<=" else v >= target) else "  MISSED")
        )
        goal = "" if target is None else f"  (target {better} {target:{fmt}})"
        return f"  {name:<44} {v:{fmt}}{goal}{ok}"

    return [
        "headline (ours; top-1 retrieval of an asset with the prompt's shape and colour):",
        row("wall time of the whole demo [s]", "total_s", ".0f", "<="),
        row("in-vocabulary prompts, seen combinations", "seen_in_vocabulary", ".3f", ">="),
        row("in-vocabulary prompts, held-out combinations", "heldout_in_vocabulary", ".3f", ">="),
        row("new-word prompts, seen combinations", "new_words_seen", ".3f", ">="),
        row("new-word prompts, held-out combinations", "new_words_heldout", ".3f", ">="),
    ]


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its finished children so far: unlike
    wall time, hardly changed by other jobs sharing the machine."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _peak_rss_mb() -> float:
    """Peak RSS of this process or any finished child (Dask workers, renderers), MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def _summary(
    cfg: Gap3dConfig,
    timings: dict[str, float],
    generated: list[dict[str, Any]],
    cpu: dict[str, float] | None = None,
) -> str:
    lines = [
        "",
        "=" * 78,
        f"gap3d demo summary  (config: {cfg.name}, workdir: {cfg.workdir})",
        "=" * 78,
    ]
    cpu = cpu or {}
    lines.append("wall time per stage (and CPU time, user + system, all processes):")
    for name, secs in timings.items():
        c = f"   cpu {cpu[name]:8.1f} s" if name in cpu else ""
        lines.append(f"  {name:<10} {secs:8.1f} s{c}")
    c = f"   cpu {sum(cpu.values()):8.1f} s" if cpu else ""
    lines.append(f"  {'total':<10} {sum(timings.values()):8.1f} s{c}")
    lines.append(
        f"  load average {os.getloadavg()[0]:.1f} (1 min) at the end; peak RSS "
        f"{_peak_rss_mb():.0f} MB"
    )
    metrics_md = cfg.eval_dir / "metrics.md"
    if metrics_md.exists():
        lines += ["", f"evaluation ({metrics_md}):", metrics_md.read_text().rstrip()]
    lines += [
        "",
        *_headline_lines(
            headline(_read_json(cfg.eval_dir / "metrics.json"), sum(timings.values()))
        ),
    ]
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
    cpu: dict[str, float] = {}
    load_start = os.getloadavg()

    def timed(name: str, target: str, **flags: Any) -> None:
        print(f"\n>>> [{name}] {target.split(':')[0]}", flush=True)
        t0, c0 = time.perf_counter(), _cpu_s()
        rc = _stage(target, cfg, **flags)
        timings[name] = time.perf_counter() - t0
        cpu[name] = _cpu_s() - c0
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

    # the prompts as one batch: models load once (gap3d generate --prompts)
    print("\n>>> [generate] gap3d.inference.generate (batch)", flush=True)
    generated: list[dict[str, Any]] = []
    t0, c0 = time.perf_counter(), _cpu_s()
    from gap3d.inference.batch import PromptJob, run_batch
    from gap3d.inference.generate import GenerateSession

    out_root = cfg.work / "generate" / "demo"
    session = GenerateSession(cfg)
    rows = run_batch(session, [PromptJob(i, p) for i, p in enumerate(prompts)], out_root)
    for r in rows:
        if r["status"] == "failed":
            raise RuntimeError(f"generate failed for prompt {r['prompt']!r}: {r['error']}")
        out = out_root / r["folder"]
        result = _read_json(out / "result.json")
        result.setdefault("prompt", r["prompt"])
        result["out_dir"] = str(out)
        generated.append(result)
    timings["generate"] = time.perf_counter() - t0
    cpu["generate"] = _cpu_s() - c0

    summary = _summary(cfg, timings, generated, cpu)
    print(summary)
    metrics = _read_json(cfg.eval_dir / "metrics.json")
    report = {
        "config": cfg.name,
        "timings_s": timings,
        "total_s": sum(timings.values()),
        "headline": headline(metrics, sum(timings.values())),
        "targets": TARGETS,
        "cpu_s": cpu,
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "peak_rss_mb": _peak_rss_mb(),
        "metrics": metrics,
        "generated": generated,
    }
    (cfg.work / "demo_summary.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    run_demo(cfg, getattr(args, "prompts", None) or None)
    return 0
