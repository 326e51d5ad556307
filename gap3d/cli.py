"""``gap3d <command> --config PRESET_OR_YAML [key.sub=value ...]``.

Every command loads the same typed config (``gap3d.config``), applies the overrides, and hands
the result to the stage's ``cli_main(cfg, args)``. Stage modules are imported lazily so that
``gap3d --help`` stays fast and a missing optional dependency only hurts the command using it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from gap3d import __version__
from gap3d.config import ConfigError, load_config


@dataclass
class Command:
    target: str  # "module:function", called as function(cfg, args) -> int
    help: str
    description: str
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    needs_config: bool = True
    aliases: list[str] = field(default_factory=list)


def _scheduler(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="attach to a running Dask scheduler (tcp://host:8786) instead of starting a "
        "LocalCluster; same as cluster.scheduler=ADDRESS",
    )


def _cache_args(p: argparse.ArgumentParser) -> None:
    _scheduler(p)
    p.add_argument(
        "--reencode-changed",
        action="store_true",
        help="re-encode committed shards whose input shard changed, vanished or was "
        "renumbered (default: refuse and name them); same as data.on_source_change=reencode",
    )


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", nargs="?", help="store path or URL (default: the config's store.path)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        metavar="last|CKPT",
        help="continue from the run's last.ckpt ('last') or from a checkpoint file",
    )


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="checkpoint to export (default: <run_dir>/checkpoints/last.ckpt)")
    p.add_argument("--out", help="output folder (default: <run_dir>/export)")


def _aligner_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--aligner", help="exported aligner folder (default: <run_dir>/export)")


def _mismatch_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-encoder-mismatch",
        action="store_true",
        help="go on (with a warning) when an encoder's weights, chat template or settings "
        "differ from those the aligner was trained on; refused by default",
    )


def _generate_args(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text prompt")
    what.add_argument(
        "--prompts",
        metavar="FILE",
        help="batch: a text file with one prompt per line, or a CSV with columns prompt "
        "[,image][,seed]; models load once, one result folder per prompt, plus "
        "results.csv and results.md (with previews) in --out",
    )
    p.add_argument("--image", help="optional image for a text+image prompt (VLM encoders only)")
    p.add_argument(
        "--out",
        help="output folder (default: <workdir>/generate/<slug>, or "
        "<workdir>/generate/batch-<file name> with --prompts)",
    )
    _aligner_arg(p)
    p.add_argument(
        "--generator",
        choices=["retrieval", "trellis", "features"],
        help="generator adapter (default: generator.name of the config)",
    )
    p.add_argument("--n-samples", type=int, help="samples per prompt (sample.n_samples)")
    p.add_argument("--seed", type=int, help="sampling seed (sample.seed)")
    p.add_argument("--steps", type=int, help="Euler steps (sample.steps)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance (sample.cfg_scale)")
    _mismatch_arg(p)


def _eval_args(p: argparse.ArgumentParser) -> None:
    _aligner_arg(p)
    p.add_argument("--out", help="output folder (default: <workdir>/eval)")
    _mismatch_arg(p)


def _app_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host", help="address to bind (app.host, default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, help="port (app.port, default 7860)")
    _aligner_arg(p)
    p.add_argument(
        "--generator",
        choices=["retrieval", "trellis", "features"],
        help="generator adapter (default: generator.name of the config)",
    )


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", nargs="*", help="prompts to generate at the end")


def _bench_args(p: argparse.ArgumentParser) -> None:
    from gap3d.plan.cli_args import add_bench_args

    add_bench_args(p)


def _plan_args(p: argparse.ArgumentParser) -> None:
    from gap3d.plan.cli_args import add_plan_args

    add_plan_args(p)


COMMANDS: dict[str, Command] = {
    "config": Command(
        "gap3d.cli:print_config",
        "print the resolved config as YAML",
        "Load a preset or YAML file, apply overrides, validate, and print the result.",
    ),
    "demo-data": Command(
        "gap3d.pipeline.demo_data:cli_main",
        "build the procedural demo asset library + URL list",
        "Generate procedural meshes (trimesh), render them headless on the CPU, write the asset "
        "library (GLB + metadata + renders) and a parquet URL list pointing at a loopback "
        "server. Held-out (shape, colour) combinations are kept out of the training list.",
    ),
    "download": Command(
        "gap3d.pipeline.download:cli_main",
        "URL list -> webdataset shards (img2dataset on Dask)",
        "Split the URL list into partitions, download each partition with img2dataset inside "
        "one Dask task, and write webdataset shards. Finished partitions are skipped on re-run; "
        "failed URLs are counted by reason in a report.",
        _scheduler,
    ),
    "cache": Command(
        "gap3d.pipeline.encode:cli_main",
        "webdataset shards -> Zarr feature store (frozen encoders)",
        "Run the frozen prompt encoder and image encoder once per sample, one Dask task per "
        "shard, and commit each shard's region of the Zarr store atomically. Committed shards "
        "are skipped, so an interrupted run resumes where it stopped. The store may live on "
        "object storage (store.path=s3://bucket/prefix/features.zarr); inputs are the "
        "downloaded shards, or existing webdataset tars (data.source=shards "
        "data.shards='/data/{00000..00999}.tar' or s3://... / https://... URLs).",
        _cache_args,
    ),
    "inspect": Command(
        "gap3d.store.describe:cli_main",
        "describe a feature store",
        "Print the manifest, array shapes and dtypes, bytes per sample, committed and missing "
        "shards, and invalid-sample counts by reason.",
        _inspect_args,
    ),
    "train": Command(
        "gap3d.trainer.train:cli_main",
        "train the aligner on the cached features (Lightning)",
        "Train the flow-matching aligner on the feature store only (no encoder is loaded). "
        "Checkpoints go to <run_dir>/checkpoints; --resume last continues exactly.",
        _train_args,
    ),
    "export": Command(
        "gap3d.trainer.export_cli:cli_main",
        "export EMA aligner weights (safetensors + JSON)",
        "Write the EMA weights as safetensors and a JSON config that records the store manifest, "
        "loadable without Lightning.",
        _export_args,
    ),
    "generate": Command(
        "gap3d.inference.generate:cli_main",
        "prompt -> image-encoder tokens -> 3D asset",
        "Encode the prompt live, sample tokens with the aligner (Euler + CFG), and hand them to "
        "a generator adapter (retrieval on CPU, TRELLIS on GPU, or raw features).",
        _generate_args,
    ),
    "eval": Command(
        "gap3d.evaluation.evaluate:cli_main",
        "alignment + retrieval metrics vs baselines",
        "On held-out store samples: per-token cosine, MSE, norm ratio, top-10 neighbour overlap, "
        "text->image Recall@K, and demo shape/colour retrieval accuracy, beside the mean-feature "
        "and regressor baselines.",
        _eval_args,
    ),
    "bench": Command(
        "gap3d.plan.bench:cli_main",
        "measure this machine for a config -> calibration JSON for `gap3d plan`",
        "Run the config's real encode stage on synthetic shards, the store writer/reader and the "
        "aligner (step probes and a short real training run) on this machine, and write what "
        "was measured (encoder samples/s, bytes/sample, store MB/s, step time, peak memory, "
        "Euler-step time) to <workdir>/calibration.json. --paper-shapes uses random-weight "
        "models of the paper's real architectures instead of the config's models.",
        _bench_args,
    ),
    "plan": Command(
        "gap3d.plan.report:cli_main",
        "estimate storage, GPU-hours and memory of a run before spending them",
        "For --pairs N image-text pairs on --gpus K devices: storage (float16/int8, with and "
        "without compression), encode and training wall time and GPU-hours, per-GPU training "
        "memory with and without gradient checkpointing, the knobs that change the answer, "
        "and warnings where a stage does not fit. Each figure says whether it was measured "
        "(gap3d bench), published (a named GPU's datasheet) or analytic. Writes "
        "<workdir>/plan/plan.{json,md}.",
        _plan_args,
    ),
    "app": Command(
        "gap3d.app.ui:cli_main",
        "local web UI to try prompts (Gradio)",
        "Serve a web page on 127.0.0.1 (app.host/app.port): prompt, optional image, seed, "
        "steps and CFG; shows the generated 3D asset in an interactive viewer, the preview "
        "renders, the PCA map of the generated tokens and the result JSON. Uses the exported "
        "aligner of the config's run (or --aligner) and any generator adapter.",
        _app_args,
    ),
    "demo": Command(
        "gap3d.demo:cli_main",
        "the whole embedded demo end to end",
        "demo-data -> download -> cache -> train -> export -> eval -> generate, then a summary "
        "table with metrics, baselines and wall time per stage.",
        _demo_args,
    ),
}


def print_config(cfg, args: argparse.Namespace) -> int:  # noqa: ANN001 - signature of all stages
    print(f"# source: {cfg.source}")
    print(cfg.to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gap3d",
        description="GAP3D: VLM prompts -> patch-level image-encoder tokens -> frozen 3D generator. "
        "Each command takes --config (preset: tiny, demo, paper; or a YAML path) and "
        "key.sub=value overrides, e.g. `gap3d train --config demo train.max_steps=200`.",
    )
    parser.add_argument("--version", action="version", version=f"gap3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description)
        p.add_argument(
            "--config",
            "-c",
            default=os.environ.get("GAP3D_CONFIG", "demo"),
            help="preset name (tiny, demo, paper) or path to a YAML file (default: demo)",
        )
        if cmd.add_args:
            cmd.add_args(p)
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="config overrides, e.g. train.lr=1e-4 data.demo.views=2",
        )
    return parser


def _apply_flag_overrides(command: str, args: argparse.Namespace) -> list[str]:
    """Flags that are shorthands for config keys become ordinary overrides."""
    extra: list[str] = []
    if getattr(args, "scheduler", None):
        extra.append(f"cluster.scheduler={args.scheduler}")
    if getattr(args, "reencode_changed", False):
        extra.append("data.on_source_change=reencode")
    if command == "generate":
        for flag, key in (
            ("n_samples", "sample.n_samples"),
            ("seed", "sample.seed"),
            ("steps", "sample.steps"),
            ("cfg_scale", "sample.cfg_scale"),
            ("generator", "generator.name"),
        ):
            v = getattr(args, flag, None)
            if v is not None:
                extra.append(f"{key}={v}")
    return extra


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    cmd = COMMANDS[args.command]
    store_arg = getattr(args, "store", None)
    if store_arg and "=" in store_arg and not os.path.exists(store_arg):
        # argparse fills the optional STORE positional first; `key=value` is an override.
        args.overrides = [store_arg, *args.overrides]
        args.store = None
    try:
        cfg = load_config(
            args.config, list(args.overrides) + _apply_flag_overrides(args.command, args)
        )
    except ConfigError as e:
        print(f"gap3d {args.command}: config error: {e}", file=sys.stderr)
        return 2
    module_name, func_name = cmd.target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(cfg, args) or 0)
    except KeyboardInterrupt:
        print(
            f"gap3d {args.command}: interrupted; re-run the same command to resume", file=sys.stderr
        )
        return 130
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        # Expected failures (bad input, refused stores, missing optional deps) get one clear
        # line; set GAP3D_DEBUG=1 for the traceback.
        if os.environ.get("GAP3D_DEBUG"):
            raise
        print(f"gap3d {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
