"""``gap3d cache``: webdataset shards -> Zarr feature store, one Dask task per shard.

The client side of the encode stage: list the input shards (``sources.py``), compare them with
the store's commit records (a committed shard whose input changed, vanished or was renumbered
is refused, or re-encoded on request), create (or reopen) the store with a spec taken from the
encoders themselves, submit one task per shard to encode (``workers.encode_shard``), follow them
with a progress bar and record the invalid-sample counts in the manifest. A failed shard is
reported and the others go on; re-running resumes, because a shard counts only once its commit
record exists. A re-run over a complete, unchanged store reads only commit records and the
inputs' metadata: no token, no cluster. Statistics need no pass of their own: each task stores
the partial moments of its shard (``gap3d.store.stats``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gap3d.config import Gap3dConfig
from gap3d.pipeline import prompt_inputs
from gap3d.pipeline.sources import SourceShard, list_sources, listed_sources
from gap3d.pipeline.workers import EncodeLimits, ShardReport, encode_shard, encoder_info
from gap3d.store import FeatureStore, StoreError, StoreSpec

__all__ = ["CacheReport", "cache", "cli_main", "store_spec"]

CACHE_HASH_SECTIONS = ("prompt_encoder", "image_encoder", "data")
RUNTIME_KEYS = ("device", "batch_size")  # encoder settings that do not change the features
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


def encoders_config_hash(cfg: Gap3dConfig) -> str:
    """Hash of the encoder settings that change what features are (runtime knobs such as the
    device and batch sizes left out): a complete store with the same hash needs no encoder."""
    d = {
        role: {k: v for k, v in getattr(cfg, role).__dict__.items() if k not in RUNTIME_KEYS}
        for role in ("prompt_encoder", "image_encoder")
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        extra={
            "data_source": cfg.data.source,
            "encoders_config": encoders_config_hash(cfg),
            **prompt_inputs.manifest_extra(cfg),
        },
        rows_per_file=cfg.store.rows_per_file,
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
    """Per-reason invalid counts (from the commit records) into the manifest under "cache"."""
    records = store.commit_records(refresh=True)
    counts = store.invalid_counts()
    summary = {
        "invalid_counts": counts,
        "n_samples": sum(r["n_samples"] for r in records.values()),
        "n_valid": sum(r["n_valid"] for r in records.values()),
        "committed_shards": len(records),
        "updated_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if store.manifest.get("cache") != summary:
        store.annotate("cache", summary)
    return counts


@dataclass
class SourceCheck:
    """Committed store shards compared with the current input shards."""

    unchanged: list[int] = field(default_factory=list)
    changed: dict[int, str] = field(default_factory=dict)  # shard id -> what differs
    removed: dict[int, str] = field(default_factory=dict)  # committed, no input any more
    todo: list[int] = field(default_factory=list)  # to encode (new, uncommitted or changed)


def check_sources(store: FeatureStore | None, sources: list[SourceShard]) -> SourceCheck:
    """Which committed shards still match their input (O(shards) metadata, no token read)."""
    out = SourceCheck()
    records = store.commit_records(refresh=True) if store is not None else {}
    by_id = {s.shard_id: s for s in sources}
    for sid, rec in records.items():
        if sid not in by_id:
            old = (rec.get("source") or {}).get("url", "?")
            out.removed[sid] = f"was encoded from {old}, which is no longer an input shard"
    for src in sources:
        rec = records.get(src.shard_id)
        if rec is None:
            out.todo.append(src.shard_id)
            continue
        old, new = rec.get("source") or {}, src.record()
        if old == new:
            out.unchanged.append(src.shard_id)
            continue
        if old.get("url") != new["url"]:
            why = f"was encoded from {old.get('url')}, the input is now {new['url']}"
        else:
            why = (
                f"its input {new['url']} changed (fingerprint {old.get('fingerprint')} -> "
                f"{new['fingerprint']})"
            )
        out.changed[src.shard_id] = why
        out.todo.append(src.shard_id)
    return out


def _refuse_changes(check: SourceCheck, store_url: str) -> None:
    problems = [
        f"store shard {s}: {why}" for s, why in sorted({**check.changed, **check.removed}.items())
    ]
    shown = "\n  ".join(problems[:20]) + (
        f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    )
    raise SourceChangedError(
        f"{store_url}: {len(problems)} committed shard(s) no longer match their input:\n  "
        f"{shown}\nRe-encode them with `gap3d cache --reencode-changed` (or "
        "data.on_source_change=reencode), or point store.path at a new store."
    )


class SourceChangedError(RuntimeError):
    """Committed shards whose input shard changed, vanished or was renumbered."""


def _open_existing(cfg: Gap3dConfig) -> FeatureStore | None:
    try:
        return FeatureStore.open(cfg.store_path, mode="r+", reader="zarr")
    except StoreError:
        return None  # absent, or unfinished: the normal path creates or reports it


def cache(
    cfg: Gap3dConfig, client: Any = None, shards: Sequence[str | Path] | None = None
) -> CacheReport:
    """Encode every input shard of ``cfg`` that is not committed (or whose input changed).

    ``client``: an existing ``distributed.Client`` (tests, notebooks); by default one is opened
    from ``cfg.cluster`` (a LocalCluster, or ``cluster.scheduler``) and closed at the end.
    ``shards``: explicit tar paths or URLs (store shard ``i`` = ``shards[i]``) instead of the
    input shards of the config (``sources.list_sources``).
    """
    t0 = time.perf_counter()
    if shards is None:
        sources = list_sources(cfg)
    else:
        sources = listed_sources([str(p) for p in shards])
    if not sources:
        where = ", ".join(cfg.data.shards) if cfg.data.source == "shards" else cfg.shards_dir
        raise FileNotFoundError(
            f"no webdataset shards in {where}; run `gap3d download` first"
            if cfg.data.source != "shards"
            else f"data.shards matched no tar: {where}"
        )
    n_shards = max(s.shard_id for s in sources) + 1
    report = CacheReport(store_path=str(cfg.store_path), n_shards=len(sources))
    store = _open_existing(cfg)
    if store is not None:
        n_shards = max(n_shards, store.n_shards)  # shards without input are handled below
    check = check_sources(store, sources)
    if (check.changed or check.removed) and cfg.data.on_source_change == "refuse":
        _refuse_changes(check, str(cfg.store_path))
    same_encoders = store is not None and (
        (store.manifest.get("extra") or {}).get("encoders_config") == encoders_config_hash(cfg)
        and store.encoding == cfg.store.encoding
        and store.samples_per_shard == cfg.data.samples_per_shard
    )
    if same_encoders and not check.todo and not check.removed:
        # Complete and unchanged: O(shards) metadata work, no cluster, no token read. (Other
        # encoder settings take the normal path, where open_or_create checks the encoders.)
        report.skipped = check.unchanged
        report.store_invalid = _record_counts(store)
        report.seconds = time.perf_counter() - t0
        return report
    if client is not None:
        _run(cfg, client, sources, n_shards, check, report)
    else:
        import dask
        import distributed  # noqa: F401 - its config defaults must exist before one is overridden

        from gap3d.pipeline.cluster import open_client

        with dask.config.set(WORKER_ENV), open_client(cfg.cluster, purpose="cache") as own:
            _run(cfg, own, sources, n_shards, check, report)
    report.seconds = time.perf_counter() - t0
    return report


def _run(
    cfg: Gap3dConfig,
    client: Any,
    sources: list[SourceShard],
    n_shards: int,
    check: SourceCheck,
    report: CacheReport,
) -> None:
    from gap3d.pipeline.cluster import gather_with_progress

    report.dashboard = getattr(client, "dashboard_link", None)
    resources = {"GPU": 1} if cfg.cluster.gpu_resources else None
    if resources:
        _check_gpu_workers(client)
    pcfg, icfg = cfg.prompt_encoder, cfg.image_encoder
    # The spec comes from the encoders on a worker: the client never loads a model.
    info = client.submit(encoder_info, pcfg, icfg, resources=resources, pure=False).result()
    spec = store_spec(cfg, info, n_shards)
    store = FeatureStore.open_or_create(cfg.store_path, spec)
    for sid in check.removed:  # data.on_source_change=reencode: inputs that vanished
        store.uncommit(sid)
    if check.changed or check.removed:
        print(
            f"gap3d cache: re-encoding {len(check.changed)} changed shard(s), uncommitting "
            f"{len(check.removed)} without input (data.on_source_change=reencode)"
        )
    report.skipped = list(check.unchanged)
    by_id = {s.shard_id: s for s in sources}
    todo = sorted(check.todo)
    limits = EncodeLimits(
        cfg.data.max_image_pixels, cfg.data.max_caption_chars, cfg.data.max_member_bytes
    )
    threads = _torch_threads(cfg)
    t0 = time.perf_counter()
    futures = [
        client.submit(
            encode_shard,
            sid,
            by_id[sid],
            store.url,
            pcfg,
            icfg,
            limits,
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
        report.failed[sid] = f"{by_id[sid].record()['url']}: {f.error}"
        print(
            f"gap3d cache: shard {sid} failed: {report.failed[sid]}\n{f.traceback}", file=sys.stderr
        )
    report.process_seconds = time.perf_counter() - t0
    report.store_invalid = _record_counts(store)


def _check_gpu_workers(client: Any) -> None:
    workers = client.scheduler_info().get("workers", {})
    if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values()):
        raise RuntimeError(
            "cluster.gpu_resources is true but no Dask worker offers a GPU resource; start "
            "workers with `dask worker ... --resources GPU=1` or set cluster.gpu_resources=false"
        )


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    """``gap3d cache``: exit 0 when every shard is committed, 1 if any shard failed."""
    try:
        report = cache(cfg)
    except SourceChangedError as e:
        print(f"gap3d cache: {e}", file=sys.stderr)
        return 1
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
    print(f"  done: {cfg.store_path} (inspect it with `gap3d inspect`)")
    return 0
