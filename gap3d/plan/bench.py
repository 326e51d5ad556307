"""``gap3d bench``: measure this machine for a config, write the calibration ``gap3d plan`` uses.

What is measured (all through the project's own code paths):

1. the device: dense matmul TFLOP/s in float32 and bfloat16 (a reference point);
2. encode: synthetic shards in img2dataset's layout go through the real cache stage (cluster
   start, model load, one encode task per shard, statistics), then each encoder alone at the
   config's batch sizes, device and dtype, with FLOPs counted on its real forward; the encode
   worker's peak memory (``bench_encode.py``);
3. store: bytes per sample as the store's array layout states them and as measured on disk,
   for float16/int8 x none/zstd, and write/read speed (``bench_encode.py``);
4. training: step time and peak memory of the config's aligner (batch, half batch,
   checkpointed) in processes of their own, with the traced figures beside them; the real
   trainer for a few steps, timed by phase (``bench_train.py``).

``--paper-shapes`` swaps the paper's hub models for random-weight models of their real
architectures (``gap3d.encoders.shapes``), so bytes per sample, encode memory and the aligner's
memory at the paper layout are measured on a machine without those weights; the aligner is then
probed as ``small`` and ``base`` at batch 1 instead of the config's preset, and the real-trainer
run is skipped (CPU minutes per step). Outputs live in ``<workdir>/bench/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import math
import time
from pathlib import Path
from typing import Any

import torch

from gap3d.config import Gap3dConfig, config_from_dict
from gap3d.layout import TokenLayout
from gap3d.plan import calibration
from gap3d.plan.cli_args import SKIPPABLE
from gap3d.plan.hardware import describe_machine, matmul_tflops, versions


def _device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


def bench_config(cfg: Gap3dConfig, paper_shapes: bool = False) -> Gap3dConfig:
    """The config the bench runs: the user's, writing under ``<workdir>/bench``; with
    ``paper_shapes`` the paper models become their ``shapes:`` stand-ins, sized for a CPU when
    no GPU is present."""
    from gap3d.encoders.shapes import paper_shapes_spec

    d = cfg.to_dict()
    d["workdir"] = str(cfg.work / "bench")
    d["store"]["path"] = None
    d["train"]["run_dir"] = None
    d["data"]["source"] = "demo"  # shards are given explicitly; no URL list is read
    d["data"]["url_list"] = None
    if paper_shapes:
        cuda = torch.cuda.is_available()
        for role, batch in (("prompt_encoder", 4), ("image_encoder", 2)):
            e = d[role]
            e["model"] = paper_shapes_spec(e["model"])
            e["revision"] = None
            if not cuda:
                # A CPU runs these stand-ins in float32 (bf16 matmuls are slow without AMX)
                # and at small batches; per-sample figures do not depend on the batch much.
                e.update(device="cpu", dtype="float32", batch_size=min(e["batch_size"], batch))
        if not cuda:
            d["data"]["samples_per_shard"] = min(d["data"]["samples_per_shard"], 4)
        d["cluster"].update(n_workers=1, scheduler=None, gpu_resources=cuda)
    d["cluster"]["scheduler"] = None
    d["cluster"]["n_workers"] = 1  # one encode worker: per-worker figures, scaled by the plan
    return config_from_dict(d, source=f"{cfg.source} (bench)")


def default_samples(cfg: Gap3dConfig) -> int:
    """Enough samples for two full shards and a few training batches."""
    S, B = cfg.data.samples_per_shard, cfg.train.batch_size
    n = max(2 * S, 4 * B, 64)
    return min(n, max(S, 1024))


def run_bench(
    cfg: Gap3dConfig,
    out: str | Path | None = None,
    *,
    samples: int | None = None,
    paper_shapes: bool = False,
    skip: tuple[str, ...] = (),
    train_steps: int | None = None,
    threads: int | None = None,
    data: str = "auto",
    sources: list[Path] | None = None,
    say: Any = print,
) -> dict[str, Any]:
    """Measure, write the calibration JSON to ``out`` (default ``<workdir>/calibration.json``
    or ``calibration-paper-shapes.json``) and return it.

    ``data``: ``auto`` encodes the first samples of the config's downloaded shards
    (``<workdir>/shards``, or ``sources``) when there are any, else synthetic ones;
    ``synthetic`` always synthetic (compressed sizes depend on the content).
    """
    from gap3d.plan import bench_encode, bench_train

    if data not in ("auto", "synthetic"):
        raise ValueError(f"--data must be auto or synthetic, got {data!r}")
    bad = sorted(set(skip) - set(SKIPPABLE))
    if bad:
        raise ValueError(f"--skip takes {', '.join(SKIPPABLE)}; got {', '.join(bad)}")
    t_start = time.perf_counter()
    bcfg = bench_config(cfg, paper_shapes)
    work = bcfg.work
    work.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    device = bcfg.image_encoder.device
    kind = _device_kind(device)
    train_device = "cuda" if kind == "cuda" or torch.cuda.is_available() else "cpu"
    if bcfg.train.accelerator == "cpu":
        train_device = "cpu"
    cal: dict[str, Any] = {
        "format": calibration.FORMAT,
        "version": calibration.VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.name,
        "config_source": cfg.source,
        "config_hash": cfg.hash(),
        "paper_shapes": paper_shapes,
        "bench_config": bcfg.to_dict(),
        "machine": describe_machine(),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
    }
    dev_name = torch.cuda.get_device_name(0) if kind == "cuda" else cal["machine"]["cpu_model"]
    say(f"bench    {cfg.name}{' (paper shapes)' if paper_shapes else ''} on {dev_name}")
    cal["device"] = {
        "kind": kind,
        "name": dev_name,
        "memory_bytes": (
            torch.cuda.get_device_properties(0).total_memory
            if kind == "cuda"
            else cal["machine"]["ram_bytes"]
        ),
        "matmul_tflops": {
            "float32": matmul_tflops("cuda" if kind == "cuda" else "cpu", "float32"),
            "bfloat16": matmul_tflops("cuda" if kind == "cuda" else "cpu", "bfloat16", n=512),
        },
    }
    say(
        f"device   matmul {cal['device']['matmul_tflops']['float32'] * 1e3:.0f} GFLOP/s fp32, "
        f"{cal['device']['matmul_tflops']['bfloat16'] * 1e3:.0f} GFLOP/s bf16"
    )

    path = Path(out) if out else _default_out(cfg, paper_shapes)
    kept = _previous(path, cal) if skip else {}
    # Paper shapes on a CPU: a few samples (tens of seconds each); per-sample figures only.
    n = samples or (2 * bcfg.data.samples_per_shard if paper_shapes else default_samples(bcfg))
    layout: TokenLayout | None = None
    prompt_dim = None
    for part in ("encode", "store"):
        if part in skip and part in kept:
            cal[part] = kept[part]
            say(f"{part:<8} kept from {path} (skipped)")
    if "encode" not in skip:
        if data == "auto" and sources is None:
            sources = _downloaded_shards(cfg)
        shards, what = bench_encode.make_shards(
            bcfg, n, work, sources if data != "synthetic" else None
        )
        say(f"data     {what}")
        enc = bench_encode.run_encode(bcfg, shards, say)
        enc["data"] = what
        enc["source_shard_bytes_per_sample"] = bench_encode.shard_bytes_per_sample(
            shards, enc["samples"]
        )
        cal["encode"] = enc
        say(
            f"encode   {enc['samples']} samples: {enc['task_s_per_sample'] * 1e3:.1f} ms/sample "
            f"per task ({enc['forward_s_per_sample'] * 1e3:.1f} in the encoders), start-up "
            f"{enc['startup_s']:.1f} s, worker peak {enc['worker_peak_rss'] / 1e9:.2f} GB"
        )
        if "store" not in skip:
            cal["store"] = bench_encode.run_store(bcfg, work, say)
    store = _bench_store(bcfg)
    if store is not None:
        layout, prompt_dim = store.layout, store.prompt_dim
    if layout is None:
        from gap3d.plan.models import encoder_shapes

        layout, prompt_dim = encoder_shapes(bcfg)

    precision = bench_train.plan_precision(
        bcfg.train.precision, "cuda" if train_device == "cuda" else "cpu"
    )
    if paper_shapes and train_device == "cpu" and precision != "32-true":
        # CPUs without bf16 matrix units run bf16 autocast orders of magnitude slower; the
        # probes then measure float32, and plans take bf16 memory from the traces.
        say(f"train    {precision} -> 32-true for the CPU probes")
        precision = "32-true"
    train: dict[str, Any] = {
        "device": train_device,
        "precision": precision,
        "layout": layout.to_dict(),
        "prompt_dim": prompt_dim,
        "prompt_len": bcfg.prompt_encoder.max_length,
    }
    if "train-step" not in skip:
        cases = (
            bench_train.paper_step_cases(bcfg, layout, prompt_dim, precision)
            if paper_shapes
            else bench_train.default_step_cases(bcfg, layout, prompt_dim, precision)
        )
        train["step_probes"] = bench_train.run_step_probes(
            cases,
            train_device,
            work / "probes",
            say,
            sample_steps=min(3, bcfg.eval.steps),
            cfg_scale=bcfg.eval.cfg_scale,
            threads=threads,
        )
    old_train = kept.get("train", {})
    if "train-step" in skip and "step_probes" in old_train:
        train["step_probes"] = old_train["step_probes"]
    if "train-run" in skip and "run" in old_train:
        train["run"] = old_train["run"]
    if "train-run" not in skip and not paper_shapes and store is not None:
        steps = train_steps or _train_steps(train.get("step_probes", []))
        try:
            train["run"] = bench_train.run_train_probe(
                _single_device(bcfg), work / "probes", steps, say, threads
            )
        except Exception as e:  # noqa: BLE001 - a failed probe is recorded, not fatal
            train["run_error"] = str(e)
            say(f"train    real trainer probe FAILED: {str(e).splitlines()[0]}")
    cal["train"] = train
    cal["bench_seconds"] = time.perf_counter() - t_start
    calibration.save(cal, path)
    say(f"wrote    {path} ({cal['bench_seconds']:.0f} s)")
    return cal


def _downloaded_shards(cfg: Gap3dConfig) -> list[Path] | None:
    """Finished shards ``gap3d download`` wrote for this config, if any."""
    try:
        from gap3d.pipeline.download import list_shards

        return list(list_shards(cfg.shards_dir)) or None
    except Exception:  # noqa: BLE001 - no shards (or no readable shards folder): synthetic
        return None


def _previous(path: Path, cal: dict[str, Any]) -> dict[str, Any]:
    """The calibration already at ``path`` if it was made for the same config on the same
    machine (its parts are kept where this run skips them), else ``{}``."""
    try:
        old = calibration.load(path)
    except calibration.CalibrationError:
        return {}
    same = all(old.get(k) == cal[k] for k in ("config_hash", "paper_shapes", "machine"))
    return old if same else {}


def _bench_store(cfg: Gap3dConfig) -> Any:
    """The bench's feature store with committed shards, if a bench wrote one."""
    from gap3d.store import FeatureStore, StoreError

    try:
        store = FeatureStore.open(cfg.store_path)
    except StoreError:
        return None
    return store if store.committed_shards() else None


def _train_steps(probes: list[dict[str, Any]]) -> int:
    """Enough steps for ~15 s of steady training (10 to 200)."""
    step = next((p["measured"]["step_s"] for p in probes if "measured" in p), 0.5)
    return int(min(200, max(10, math.ceil(15.0 / max(step, 1e-3)))))


def _single_device(cfg: Gap3dConfig) -> Gap3dConfig:
    """The trainer probe runs on one device (per-device figures; the plan scales them)."""
    if cfg.train.devices == 1:
        return cfg
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, devices=1, strategy="auto")
    )


def _default_out(cfg: Gap3dConfig, paper_shapes: bool) -> Path:
    p = calibration.default_path(cfg)
    return p.with_name("calibration-paper-shapes.json") if paper_shapes else p


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    """``gap3d bench``."""
    skip = tuple(s.strip() for s in (getattr(args, "skip", "") or "").split(",") if s.strip())
    run_bench(
        cfg,
        getattr(args, "out", None),
        samples=getattr(args, "samples", None),
        paper_shapes=bool(getattr(args, "paper_shapes", False)),
        skip=skip,
        train_steps=getattr(args, "train_steps", None),
        threads=getattr(args, "threads", None),
        data=getattr(args, "data", "auto") or "auto",
    )
    return 0
