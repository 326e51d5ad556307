"""``gap3d bench``, encode and store parts: the real cache stage on synthetic shards.

The encode stage runs exactly as ``gap3d cache`` runs it: the same ``open_client`` cluster
(timed), ``encode.cache`` submitting the real encode task of ``gap3d.pipeline.workers`` per
shard, statistics at the end. Then, in the same worker process, the encoders alone (at the
config's batch sizes, device and dtype) and the worker's peak memory. The store part reads the
written samples back and writes them again with the store writer in every encoding x
compression, to measure bytes per sample and write/read speed.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from gap3d.config import Gap3dConfig

# Encoders with more parameters than this count FLOPs during the timed pass (a second pass
# would cost minutes on a CPU); smaller ones count in a separate pass (the counter's per-op
# overhead would distort their timing).
_BIG_MODEL = 50_000_000


def _modules(encoder: Any) -> list[Any]:
    import torch

    return [v for v in vars(encoder).values() if isinstance(v, torch.nn.Module)]


def _params(encoder: Any) -> int:
    return sum(p.numel() for m in _modules(encoder) for p in m.parameters())


def _weight_bytes(encoder: Any) -> int:
    return sum(p.numel() * p.element_size() for m in _modules(encoder) for p in m.parameters())


def _layer_flops(counts: dict[str, dict[Any, int]]) -> float:
    """FLOPs of the first decoder layer (``...layers.0``) in a FlopCounterMode breakdown."""
    for name, ops in counts.items():
        if name.endswith("language_model.layers.0"):
            return float(sum(ops.values()))
    return 0.0


def worker_stats() -> dict[str, Any]:
    """Peak memory (resident, and CUDA if any) and CPU seconds of this (worker) process."""
    import torch

    ru = resource.getrusage(resource.RUSAGE_SELF)
    r = ru.ru_maxrss
    out: dict[str, Any] = {
        "peak_rss": int(r if sys.platform == "darwin" else r * 1024),
        "cpu_s": ru.ru_utime + ru.ru_stime,
    }
    if torch.cuda.is_available():
        out["cuda_peak_allocated"] = int(torch.cuda.max_memory_allocated())
        out["cuda_peak_reserved"] = int(torch.cuda.max_memory_reserved())
    return out


def encoder_rates(
    pcfg: Any, icfg: Any, tar_path: str, max_image_pixels: int, max_caption_chars: int
) -> dict[str, Any]:
    """In a worker: each encoder alone on one shard's valid samples (models already loaded)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gap3d.pipeline.decode import decode_any
    from gap3d.pipeline.tars import read_tar
    from gap3d.pipeline.workers import get_encoders

    decoded = [
        decode_any(s, max_image_pixels, max_caption_chars) for s in read_tar(tar_path).samples
    ]
    valid = [d for d in decoded if d.valid]
    if not valid:
        raise RuntimeError(f"no valid samples in {tar_path}")
    caps, imgs = [d.caption for d in valid], [d.image for d in valid]
    enc = get_encoders(pcfg, icfg)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out: dict[str, Any] = {"samples": len(valid), "torch_threads": torch.get_num_threads()}
    with enc.lock:
        for role, run, model in (
            ("prompt", lambda: enc.prompt.encode(caps, pad_to_max=True), enc.prompt),
            ("image", lambda: enc.image.encode(imgs), enc.image),
        ):
            big = _params(model) > _BIG_MODEL
            counter = FlopCounterMode(display=False, depth=None)
            sync()
            t0 = time.perf_counter()
            if big:
                with counter:
                    result = run()
            else:
                result = run()
            sync()
            seconds = time.perf_counter() - t0
            if not big:
                with counter:
                    run()
            info: dict[str, Any] = {
                "samples_per_s": len(valid) / seconds,
                "seconds": seconds,
                "flops_per_sample": counter.get_total_flops() / len(valid),
                "layer_flops_per_sample": _layer_flops(counter.get_flop_counts()) / len(valid),
                "params": _params(model),
                "weight_bytes": _weight_bytes(model),
                "batch_size": model.cfg.batch_size,
                "device": model.cfg.device,
                "dtype": model.cfg.dtype,
                "model": model.cfg.model,
                "flops_counted_in_timed_pass": big,
            }
            if role == "prompt":
                info["tokens_per_prompt"] = float(result.mask.sum(1).float().mean())
            else:
                # the CPU share of the image encoder (resize, normalise): on a GPU node it
                # stays on the host while the forward moves to the device
                t0 = time.perf_counter()
                model.preprocess(imgs)
                info["preprocess_s_per_sample"] = (time.perf_counter() - t0) / len(imgs)
            out[role] = info
    return out


def run_encode(cfg: Gap3dConfig, shards: list[Path], say: Any) -> dict[str, Any]:
    """The cache stage on ``shards`` into ``cfg.store_path``, timed part by part."""
    import dask
    import distributed  # noqa: F401 - its config defaults must exist before one is overridden

    from gap3d.pipeline.cluster import open_client
    from gap3d.pipeline.encode import WORKER_ENV, cache
    from gap3d.pipeline.workers import encoder_info

    shutil.rmtree(Path(cfg.store_path), ignore_errors=True)
    resources = {"GPU": 1} if cfg.cluster.gpu_resources else None
    t0 = time.perf_counter()
    with dask.config.set(WORKER_ENV), open_client(cfg.cluster, purpose="bench") as client:
        cluster_start = time.perf_counter() - t0
        say(f"encode   cluster up in {cluster_start:.1f} s; loading the encoders")
        # Load the models apart (the stage's own first call then finds them loaded), so that
        # loading and encoding are timed separately, in wall and in worker CPU seconds.
        t1 = time.perf_counter()
        client.submit(
            encoder_info, cfg.prompt_encoder, cfg.image_encoder, resources=resources, pure=False
        ).result()
        load_s = time.perf_counter() - t1
        loaded = client.run(worker_stats)
        say(f"encode   encoders loaded in {load_s:.1f} s; caching {len(shards)} shard(s)")
        p0 = time.process_time()
        report = cache(cfg, client=client, shards=shards)
        client_cpu = time.process_time() - p0
        if not report.ok:
            raise RuntimeError(f"bench encode failed: {report.failed}")
        memory = client.run(worker_stats)
        say("encode   timing each encoder alone in the worker")
        rates = client.submit(
            encoder_rates,
            cfg.prompt_encoder,
            cfg.image_encoder,
            str(shards[0]),
            cfg.data.max_image_pixels,
            cfg.data.max_caption_chars,
            pure=False,
        ).result()
    # Statistics are merged from the per-shard moments each commit records: there is no pass
    # over the tokens to time (the key stays for calibrations read by older plans).
    finalize_s = 0.0
    done = report.done
    n = sum(r.n_samples for r in done)
    task_s = sum(r.seconds for r in done)
    forward_s = sum(r.encode_seconds for r in done)
    workers = max(1, len(memory))
    load_cpu = sum(m["cpu_s"] for m in loaded.values()) / workers
    work_cpu = sum(memory[w]["cpu_s"] - loaded[w]["cpu_s"] for w in memory)
    return {
        "samples": n,
        "valid": sum(r.n_valid for r in done),
        "shards": len(done),
        "samples_per_shard": cfg.data.samples_per_shard,
        "workers": workers,
        "torch_threads": rates.get("torch_threads"),
        "cluster_start_s": cluster_start,
        "stage_s": report.seconds,  # cache() on the running cluster: load + tasks + statistics
        "process_s": report.process_seconds,
        "load_s": load_s,
        "startup_s": load_s + max(0.0, report.seconds - report.process_seconds - finalize_s),
        # CPU seconds: a worker's until its models are loaded, then the stage's per sample
        # (workers' and this client's), which do not depend on the machine's other load
        "load_cpu_s": load_cpu,
        "worker_cpu_s_per_sample": work_cpu / n,
        "client_cpu_s_per_sample": client_cpu / n,
        "task_s_per_sample": task_s / n,
        "task_s_per_shard": task_s / len(done),
        "forward_s_per_sample": forward_s / n,
        "host_s_per_sample": (task_s - forward_s) / n,
        "finalize_s_per_sample": finalize_s / n,
        "finalize_s": finalize_s,
        "worker_peak_rss": max(m["peak_rss"] for m in memory.values()),
        "worker_cuda_peak_allocated": max(
            (m.get("cuda_peak_allocated", 0) for m in memory.values()), default=0
        ),
        "prompt_encoder": rates["prompt"],
        "image_encoder": rates["image"],
    }


# --------------------------------------------------------------------------------------------
# store
# --------------------------------------------------------------------------------------------


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fixed_bytes(path: Path, arrays: Any) -> int:
    """Bytes of a store that do not grow with its samples: everything but array chunks."""
    data = sum(
        p.stat().st_size
        for name in arrays
        for p in (path / name).rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    return _dir_bytes(path) - data


def _shard_data(store: Any, shard: int) -> Any:
    from gap3d.store import ShardData

    S = store.samples_per_shard
    n = store.commit_info(shard)["n_samples"]
    rows = np.arange(shard * S, shard * S + n)
    d = store.read(rows)
    return ShardData(
        image_tokens=d["image_tokens"],
        prompt_latents=d["prompt_latents"],
        prompt_mask=d["prompt_mask"],
        caption=d["caption"],
        key=d["key"],
        url=d["url"],
        split=d["split"],
        meta=d["meta"],
        reason=d["reason"],
        thumbnail=d["thumbnail"],
    )


def run_store(cfg: Gap3dConfig, workdir: Path, say: Any) -> dict[str, Any]:
    """Bytes per sample (layout and on disk) for every encoding x compression, and speeds."""
    from gap3d.store import FeatureStore
    from gap3d.store.manifest import spec_from_manifest
    from gap3d.store.schema import FEATURE_ARRAYS, array_layout

    src = FeatureStore.open(cfg.store_path)
    shards = src.committed_shards()
    data = {s: _shard_data(src, s) for s in shards}
    n = sum(len(d) for d in data.values())
    base = spec_from_manifest(src.manifest)
    out: dict[str, Any] = {
        "samples": n,
        "shards": len(shards),
        "layout": {},
        "on_disk": {},
        "fixed_bytes": {},
    }
    write_bytes = write_s = 0.0
    for encoding in ("float16", "int8"):
        for compression in ("none", "zstd"):
            combo = f"{encoding}/{compression}"
            spec = dataclasses.replace(base, encoding=encoding, compression=compression)
            # what the store layout says one sample occupies, array by array
            layout = array_layout(dataclasses.replace(spec, n_shards=1))
            out["layout"][combo] = {
                name: {
                    "shape": a["shape"][1:],
                    "dtype": a["dtype"],
                    "bytes_per_sample": (
                        int(np.prod(a["shape"][1:], dtype=np.int64)) * np.dtype(a["dtype"]).itemsize
                        if a["dtype"] != "str"
                        else None
                    ),
                    "compression": a["compression"],
                }
                for name, a in layout.items()
            }
            path = workdir / f"store-{encoding}-{compression}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            store = FeatureStore.create(path, spec)
            empty = {name: _dir_bytes(path / name) for name in layout}
            for s, d in data.items():
                t0 = time.perf_counter()
                store.write_shard(s, d)
                write_s += time.perf_counter() - t0
            sizes = {name: _dir_bytes(path / name) for name in layout}
            write_bytes += sum(sizes.values()) - sum(empty.values())
            out["on_disk"][combo] = {name: (sizes[name] - empty[name]) / n for name in layout}
            out["fixed_bytes"][combo] = _fixed_bytes(path, layout)
            if combo != f"{cfg.store.encoding}/{cfg.store.compression}":
                shutil.rmtree(path, ignore_errors=True)
            else:
                read_path = path
    # Besides the sample arrays, the stage's own store holds metadata, commit records,
    # statistics and annotations: what an empty store of the same spec holds is fixed, the
    # rest grows with the shards.
    configured = f"{cfg.store.encoding}/{cfg.store.compression}"
    empty_path = workdir / "store-empty.zarr"
    shutil.rmtree(empty_path, ignore_errors=True)
    FeatureStore.create(empty_path, base)
    names = list(out["layout"][configured])
    fixed = _fixed_bytes(empty_path, names)
    out["fixed_bytes"][configured] = fixed
    out["shard_overhead_bytes"] = max(
        0.0, (_fixed_bytes(Path(cfg.store_path), names) - fixed) / max(1, len(shards))
    )
    shutil.rmtree(empty_path, ignore_errors=True)
    say(f"store    {n} samples written in 4 encodings, {write_bytes / 1e6:.1f} MB")
    # Reads as the trainer does them: random sorted batches of the trainer's arrays.
    store = FeatureStore.open(read_path)
    rows = store.indices()
    bs = min(cfg.train.batch_size, len(rows))
    rng = np.random.default_rng(0)
    fields = ("image_tokens", "prompt_latents", "prompt_mask")
    t0, reads = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0 or reads < 3:
        store.read(np.sort(rng.choice(rows, bs, replace=False)), fields=fields)
        reads += 1
    read_s = time.perf_counter() - t0
    combo = f"{cfg.store.encoding}/{cfg.store.compression}"
    stored = sum(v for k, v in out["on_disk"][combo].items() if k in FEATURE_ARRAYS)
    out["write_mb_s"] = write_bytes / write_s / 1e6 if write_s else None
    out["read_samples_per_s"] = reads * bs / read_s
    out["read_mb_s"] = reads * bs * stored / read_s / 1e6
    out["read_batch"] = bs
    shutil.rmtree(read_path, ignore_errors=True)
    return out


def make_shards(
    cfg: Gap3dConfig,
    n_samples: int,
    workdir: Path,
    sources: list[Path] | None = None,
    seed: int = 0,
) -> tuple[list[Path], str]:
    """Bench shards of ``data.samples_per_shard`` samples: the first ``n_samples`` of
    ``sources`` (the user's downloaded shards) when given, else synthetic; and what they are."""
    from gap3d.plan.synthetic import repack_shards, write_synthetic_shards

    out = workdir / "shards"
    shutil.rmtree(out, ignore_errors=True)
    S = cfg.data.samples_per_shard
    if sources:
        paths, n = repack_shards(sources, out, n_samples, S)
        if n >= min(n_samples, S):
            return paths, f"the first {n} samples of {len(sources)} downloaded shard(s)"
        shutil.rmtree(out, ignore_errors=True)  # too few for one shard: synthetic instead
    paths = write_synthetic_shards(out, n_samples, S, cfg.data.download_image_size, seed)
    return paths, "synthetic (procedural images, demo captions)"


def shard_bytes_per_sample(shards: list[Path], n: int) -> float:
    return sum(os.path.getsize(p) for p in shards) / max(1, n)
