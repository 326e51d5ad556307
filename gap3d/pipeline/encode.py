"""``gap3d cache``: webdataset shards -> Zarr feature store, one Dask task per shard.

The client side of the encode stage: list the shards, create (or reopen) the store with a spec
taken from the encoders themselves, skip committed shards, submit one task per remaining shard
(``workers.encode_shard``), follow them with a progress bar, then compute the store statistics
and record the invalid-sample counts in the manifest. A failed shard is reported and the others
go on; re-running resumes, because a shard counts only once its commit marker exists.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr

from gap3d.config import Gap3dConfig
from gap3d.pipeline import prompt_inputs
from gap3d.pipeline.workers import ShardReport, encode_shard, encoder_info
from gap3d.store import FeatureStore, StoreSpec
from gap3d.store.manifest import MANIFEST_KEY

__all__ = ["CacheReport", "cache", "cli_main", "store_spec"]

CACHE_HASH_SECTIONS = ("prompt_encoder", "image_encoder", "data")
# Environment of the LocalCluster's worker processes (read by the nanny when it spawns them).
# One malloc arena: the encoders run in a Dask executor thread, and glibc's per-thread arenas
# made the same forward pass ~18% slower there than in a main thread (benchmarks/cache.py).
# Workers of an external cluster: start them with MALLOC_ARENA_MAX=1 in their environment.
WORKER_ENV = {"distributed.nanny.pre-spawn-environ.MALLOC_ARENA_MAX": 1}


@dataclass
class CacheReport:
    """The outcome of one ``gap3d cache`` run."""

    store_path: str
    n_shards: int
    done: list[ShardReport] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # committed before this run
    failed: dict[int, str] = field(default_factory=dict)  # shard id -> why
    seconds: float = 0.0  # whole run, cluster start included
    process_seconds: float = 0.0  # from the first submitted shard to the last result
    dashboard: str | None = None
    store_invalid: dict[str, int] = field(default_factory=dict)  # whole store, after the run

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def n_samples(self) -> int:
        return sum(r.n_samples for r in self.done)

    @property
    def n_valid(self) -> int:
        return sum(r.n_valid for r in self.done)

    @property
    def invalid(self) -> dict[str, int]:
        """Invalid samples of this run's shards by reason."""
        c: Counter[str] = Counter()
        for r in self.done:
            c.update(r.invalid)
        return dict(c.most_common())

    @property
    def samples_per_s(self) -> float:
        return self.n_samples / self.process_seconds if self.process_seconds > 0 else 0.0

    def summary(self) -> str:
        """Human-readable lines for the end of the run."""
        inv = self.invalid
        reasons = ", ".join(f"{k} {v}" for k, v in inv.items()) or "none"
        lines = [
            f"store {self.store_path}",
            f"  shards: {self.n_shards} total, {len(self.done)} encoded, "
            f"{len(self.skipped)} skipped (already committed), {len(self.failed)} failed",
            f"  samples this run: {self.n_samples} ({self.n_valid} valid, "
            f"{sum(inv.values())} invalid: {reasons})",
            f"  time: {self.seconds:.1f} s total, {self.process_seconds:.1f} s encoding, "
            f"{self.samples_per_s:.1f} samples/s",
        ]
        if self.dashboard:
            lines.append(f"  Dask dashboard (while the run lasted): {self.dashboard}")
        damaged = [r for r in self.done if r.tar_error]
        for r in damaged:
            lines.append(
                f"  damaged tar, kept the samples before the damage: shard "
                f"{r.shard_id} {r.path}: {r.tar_error}"
            )
        for sid, why in sorted(self.failed.items()):
            lines.append(f"  FAILED shard {sid}: {why}")
        if self.failed:
            lines.append(
                "  re-run the same command to retry the failed shards (committed "
                "shards are skipped)"
            )
        return "\n".join(lines)


def store_spec(cfg: Gap3dConfig, info: dict[str, Any], n_shards: int) -> StoreSpec:
    """The store spec from the encoders' own description (``workers.encoder_info``)."""
    return StoreSpec(
        layout=info["layout"],
        prompt_dim=info["prompt_dim"],
        prompt_max_length=info["prompt_max_length"],
        n_shards=n_shards,
        samples_per_shard=cfg.data.samples_per_shard,
        encoding=cfg.store.encoding,
        compression=cfg.store.compression,
        prompt_encoder=info["prompt"],
        image_encoder=info["image"],
        prompt_template=cfg.prompt_encoder.template,
        config_hash=cfg.hash(*CACHE_HASH_SECTIONS),
        extra={"data_source": cfg.data.source, **prompt_inputs.manifest_extra(cfg)},
    )


def _torch_threads(cfg: Gap3dConfig) -> int | None:
    """``cluster.torch_threads``, else a fair share of this machine's cores per worker process
    (None: leave the worker alone)."""
    c = cfg.cluster
    if c.torch_threads:
        return c.torch_threads
    if c.scheduler or not c.processes:
        return None  # remote workers know their machines; threads share this process
    return max(1, (os.cpu_count() or 1) // c.n_workers)


def _record_counts(store: FeatureStore) -> dict[str, int]:
    """Per-reason invalid counts (from the commit markers) into the manifest under "cache"."""
    counts = store.invalid_counts()
    markers = [store.commit_info(s) for s in store.committed_shards()]
    group = zarr.open_group(str(store.path), mode="r+", zarr_format=3)
    m = dict(group.attrs[MANIFEST_KEY])
    m["cache"] = {
        "invalid_counts": counts,
        "n_samples": sum(k["n_samples"] for k in markers),
        "n_valid": sum(k["n_valid"] for k in markers),
        "committed_shards": len(markers),
        "updated_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    group.update_attributes({MANIFEST_KEY: m})
    store.manifest = m
    return counts


def _all_done(cfg: Gap3dConfig, n_shards: int) -> FeatureStore | None:
    """The store, if it already holds every shard for this very config (no cluster needed)."""
    try:
        store = FeatureStore.open(cfg.store_path, mode="r+")
    except Exception:  # noqa: BLE001 - absent or unreadable: the normal path reports it
        return None
    same = store.manifest.get("config_hash") == cfg.hash(*CACHE_HASH_SECTIONS)
    if same and store.n_shards == n_shards and not store.missing_shards():
        return store
    return None


def _finish(store: FeatureStore, report: CacheReport) -> None:
    info = store.stats_info()
    if store.committed_shards() and (info is None or info["stale"] or report.done):
        store.finalize(progress=True)
    report.store_invalid = _record_counts(store)


def cache(
    cfg: Gap3dConfig, client: Any = None, shards: Sequence[str | Path] | None = None
) -> CacheReport:
    """Encode every uncommitted shard of ``cfg.shards_dir`` into ``cfg.store_path``.

    ``client``: an existing ``distributed.Client`` (tests, notebooks); by default one is opened
    from ``cfg.cluster`` (a LocalCluster, or ``cluster.scheduler``) and closed at the end.
    ``shards``: explicit tar paths (store shard ``i`` = ``shards[i]``) instead of the finished
    shards that ``download.list_shards(cfg.shards_dir)`` finds.
    """
    t0 = time.perf_counter()
    if shards is None:
        from gap3d.pipeline.download import list_shards

        shards = list_shards(cfg.shards_dir)
    shards = [str(p) for p in shards]
    if not shards:
        raise FileNotFoundError(
            f"no webdataset shards in {cfg.shards_dir}; run `gap3d download` first"
        )
    report = CacheReport(store_path=str(cfg.store_path), n_shards=len(shards))
    store = _all_done(cfg, len(shards))
    if store is not None:
        report.skipped = store.committed_shards()
        _finish(store, report)
        report.seconds = time.perf_counter() - t0
        return report
    if client is not None:
        _run(cfg, client, shards, report)
    else:
        import dask
        import distributed  # noqa: F401 - its config defaults must exist before one is overridden

        from gap3d.pipeline.cluster import open_client

        with dask.config.set(WORKER_ENV), open_client(cfg.cluster, purpose="cache") as own:
            _run(cfg, own, shards, report)
    report.seconds = time.perf_counter() - t0
    return report


def _run(cfg: Gap3dConfig, client: Any, shards: list[str], report: CacheReport) -> None:
    from gap3d.pipeline.cluster import gather_with_progress

    report.dashboard = getattr(client, "dashboard_link", None)
    resources = {"GPU": 1} if cfg.cluster.gpu_resources else None
    if resources:
        _check_gpu_workers(client)
    pcfg, icfg = cfg.prompt_encoder, cfg.image_encoder
    # The spec comes from the encoders on a worker: the client never loads a model.
    info = client.submit(encoder_info, pcfg, icfg, resources=resources, pure=False).result()
    store = FeatureStore.open_or_create(cfg.store_path, store_spec(cfg, info, len(shards)))
    report.skipped = store.committed_shards()
    todo = [s for s in range(len(shards)) if s not in set(report.skipped)]
    threads = _torch_threads(cfg)
    t0 = time.perf_counter()
    futures = [
        client.submit(
            encode_shard,
            sid,
            shards[sid],
            str(store.path),
            pcfg,
            icfg,
            cfg.data.max_image_pixels,
            cfg.data.max_caption_chars,
            threads,
            resources=resources,
            pure=False,
            key=f"encode-shard-{sid:06d}-{os.urandom(4).hex()}",
        )
        for sid in todo
    ]
    results, failures = gather_with_progress(futures, desc="encode shards", unit="shard")
    report.done = sorted((r for r in results if r is not None), key=lambda r: r.shard_id)
    for f in failures:
        sid = todo[f.index]
        report.failed[sid] = f"{shards[sid]}: {f.error}"
        print(
            f"gap3d cache: shard {sid} failed: {report.failed[sid]}\n{f.traceback}", file=sys.stderr
        )
    report.process_seconds = time.perf_counter() - t0
    _finish(store, report)


def _check_gpu_workers(client: Any) -> None:
    workers = client.scheduler_info().get("workers", {})
    if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values()):
        raise RuntimeError(
            "cluster.gpu_resources is true but no Dask worker offers a GPU resource; start "
            "workers with `dask worker ... --resources GPU=1` or set cluster.gpu_resources=false"
        )


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    """``gap3d cache``: exit 0 when every shard is committed, 1 if any shard failed."""
    report = cache(cfg)
    print(report.summary())
    if report.store_invalid:
        total = ", ".join(f"{k} {v}" for k, v in report.store_invalid.items())
        print(f"  invalid samples in the whole store: {total}")
    if not report.ok:
        print(
            f"gap3d cache: {len(report.failed)} shard(s) failed; re-running resumes",
            file=sys.stderr,
        )
        return 1
    print(f"  done: {Path(cfg.store_path)} (inspect it with `gap3d inspect`)")
    return 0
