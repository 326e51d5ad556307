"""Command-line options of ``gap3d bench`` and ``gap3d plan`` (no heavy imports: ``gap3d
--help`` builds every sub-parser)."""

from __future__ import annotations

import argparse

SKIPPABLE = ("encode", "store", "train-step", "train-run")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="calibration JSON to write (default: <workdir>/calibration.json)")
    p.add_argument(
        "--paper-shapes",
        action="store_true",
        help="random-weight models of the paper's real architectures (DINOv2-L/14-reg, "
        "Qwen2.5-VL at hidden 2048 with 2 layers) instead of the config's models: measured "
        "bytes/sample, encode memory and aligner memory at the paper layout (slow on a CPU)",
    )
    p.add_argument("--samples", type=int, help="samples to encode (default: 2 shards)")
    p.add_argument(
        "--data",
        choices=["auto", "synthetic"],
        default="auto",
        help="auto: the first samples of the shards `gap3d download` wrote for this config "
        "(compressed sizes depend on the content), synthetic ones if there are none; "
        "synthetic: always synthetic",
    )
    p.add_argument(
        "--train-steps", type=int, help="steps of the real-trainer probe (default ~15 s)"
    )
    p.add_argument(
        "--skip",
        default="",
        help=f"comma-separated parts to skip: {', '.join(SKIPPABLE)}; a skipped part keeps its "
        "figures from the calibration already at --out (same config and machine), and "
        "train-run reuses the bench store an earlier run wrote",
    )
    p.add_argument("--threads", type=int, help="torch threads for the probes (default: torch's)")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pairs", type=int, required=True, help="image-text pairs to cache and train on"
    )
    p.add_argument(
        "--gpus",
        type=int,
        help="GPUs (encode workers and DDP training devices; default: train.devices)",
    )
    p.add_argument(
        "--gpu",
        help="plan for this GPU with its published figures: h100, h100-pcie, h200, a100, "
        "a100-40gb, l40s, l4, a10, rtx-4090 (default: the calibration's device)",
    )
    p.add_argument(
        "--calibration",
        help="calibration JSON from `gap3d bench` (default: <workdir>/calibration.json, "
        "else <workdir>/calibration-paper-shapes.json, if present)",
    )
    p.add_argument("--epochs", type=float, help="plan by epochs instead of train.max_steps")
    p.add_argument("--grad-ckpt", action="store_true", help="with gradient checkpointing")
    p.add_argument(
        "--disk", type=float, help="disk for the store + shards, in TB (default: free space here)"
    )
    p.add_argument("--mfu-train", type=float, help="assumed training utilisation of peak FLOP/s")
    p.add_argument("--mfu-infer", type=float, help="assumed inference utilisation of peak FLOP/s")
    p.add_argument("--out", help="folder for plan.json and plan.md (default: <workdir>/plan)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--no-knobs", action="store_true", help="skip the table of alternatives")
