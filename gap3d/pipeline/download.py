"""``gap3d download``: URL list -> webdataset shards, one Dask task per URL partition.

The URL list (parquet, csv or tsv) is validated, split into contiguous partitions of
``data.partition_rows`` rows (fixed size: rows appended to the list add partitions and never
move rows between old ones) and each partition is downloaded by ``img2dataset.download``
inside one Dask task:

    <shards_dir>/_inputs/part-00000.parquet     the partition's rows (url, caption, extras)
    <shards_dir>/part-00000/00000.tar           webdataset shards: <key>.jpg/.txt/.json
    <shards_dir>/part-00000/00000_stats.json    img2dataset's per-shard stats
    <shards_dir>/part-00000/_done.json          written last: fingerprint, stats, shard list
    <shards_dir>/download_report.json           totals and failures by reason, every run

Each sample's ``.json`` carries ``url``, ``caption``, ``key``, ``status``, sizes and the extra
columns (``data.extra_cols``; for the demo also ``asset_id, shape, colour, split, view``).
A partition whose ``_done.json`` matches its input and download settings is skipped; one
without it is wiped and downloaded again. URLs that fail are counted by reason, never fatal.

``gap3d.pipeline.sources`` turns the finished shards into store shards: tar ``j`` of partition
``p`` is store shard ``p * ceil(partition_rows / samples_per_shard) + j``. img2dataset numbers
sample keys per partition, so keys repeat across partitions; :func:`sample_id` makes them
unique (``part-00001/0000003``).

The demo's URLs point at a loopback server in this process, so its download needs the Dask
workers on this host (the default LocalCluster). Changing ``data.demo.port`` changes every
URL and therefore re-downloads every partition.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
import types
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gap3d.config import Gap3dConfig
from gap3d.pipeline.url_policy import (
    img2dataset_header_directives,
    keep_web_urls,
    read_rejected,
    write_rejected,
)

DONE_MARKER = "_done.json"
REPORT_FILE = "download_report.json"
INPUTS_DIR = "_inputs"
# img2dataset writes these fields itself and refuses them as additional columns.
RESERVED_COLUMNS = frozenset(
    "key caption url width height original_width original_height status error_message exif "
    "md5 sha256 sha512".split()
)


@dataclass
class PartitionTask:
    """One Dask task's work: download ``input_path`` into ``output_dir``."""

    index: int
    input_path: str
    output_dir: str
    fingerprint: str
    options: dict[str, Any]  # keyword arguments for img2dataset.download
    rows: int = 0  # rows in the input; a shortfall in img2dataset's stats is an error


@dataclass
class PartitionResult:
    index: int
    rows: int
    successes: int
    failures: dict[str, int]  # reason -> count
    shards: list[str]  # tar file names inside the partition folder
    seconds: float
    skipped: bool = False


@dataclass
class DownloadReport:
    """What a download run produced (also written to ``download_report.json``)."""

    url_list: str
    shards_dir: str
    rows: int
    successes: int
    failures_by_reason: dict[str, int]
    n_shards: int
    seconds: float
    partitions: list[PartitionResult] = field(default_factory=list)
    task_failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(self.failures_by_reason.values())

    @property
    def complete(self) -> bool:
        return not self.task_failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = self.failures
        d["complete"] = self.complete
        return d


# --------------------------------------------------------------------------------------------
# URL list
# --------------------------------------------------------------------------------------------


def read_url_list(path: str | Path, url_col: str, caption_col: str, extra_cols: list[str]) -> Any:
    """Read a parquet/csv/tsv URL list as a pyarrow Table with exactly the needed columns."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"URL list not found: {path} (data.url_list)")
    name = path.name.lower().removesuffix(".gz")
    table = None
    if name.endswith(".parquet"):
        names = pq.read_schema(path).names  # read only the needed columns further down
    elif name.endswith((".csv", ".tsv")):
        delim = "\t" if name.endswith(".tsv") else ","
        table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delim))
        names = table.column_names
    else:
        raise ValueError(f"URL list {path}: unsupported format; use .parquet, .csv or .tsv")
    reserved = sorted(set(extra_cols) & RESERVED_COLUMNS)
    if reserved:
        raise ValueError(
            f"data.extra_cols {reserved} clash with fields img2dataset writes itself; rename "
            "those columns in the URL list"
        )
    wanted = list(dict.fromkeys([url_col, caption_col, *extra_cols]))
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ValueError(
            f"URL list {path} lacks column(s) {missing}; available: {names} "
            "(set data.url_col / data.caption_col / data.extra_cols)"
        )
    table = pq.read_table(path, columns=wanted) if table is None else table.select(wanted)
    if table.num_rows == 0:
        raise ValueError(f"URL list {path} has no rows")
    return table


def _truncate_captions(table: Any, col: str, max_chars: int) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    caps = pc.utf8_slice_codeunits(pc.cast(table[col], pa.string()), 0, max_chars)
    return table.set_column(table.column_names.index(col), col, pc.fill_null(caps, ""))


def _table_digest(table: Any) -> str:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# one partition (runs on a Dask worker)
# --------------------------------------------------------------------------------------------


def read_done_marker(out: Path) -> dict[str, Any] | None:
    """The partition's ``_done.json`` (None while it is not finished)."""
    try:
        return json.loads((out / DONE_MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _result_from_marker(index: int, marker: dict[str, Any], skipped: bool) -> PartitionResult:
    return PartitionResult(
        index=index,
        rows=marker["rows"],
        successes=marker["successes"],
        failures=dict(marker["failures"]),
        shards=list(marker["shards"]),
        seconds=marker["seconds"],
        skipped=skipped,
    )


def normalise_reason(status: str) -> str:
    """Group error messages: object addresses and long tails would make each one unique."""
    s = re.sub(r"0x[0-9a-fA-F]+", "0x…", str(status))
    return s if len(s) <= 160 else s[:157] + "..."


def _run_img2dataset(**kwargs: Any) -> None:
    # albumentations (imported by img2dataset) asks the network for updates unless told not to.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    # img2dataset installs a SIGINT handler, which Python only allows in the main thread;
    # Dask runs tasks in worker threads. The handler only tidies up after Ctrl-C in its own
    # CLI, so in a worker thread we give that module a stand-in ``signal`` whose install is a
    # no-op (module-local: Python's signal module itself is untouched).
    if threading.current_thread() is not threading.main_thread():
        main_mod = sys.modules["img2dataset.main"]
        main_mod.signal = types.SimpleNamespace(  # type: ignore[attr-defined]
            SIGINT=signal.SIGINT, signal=lambda *a, **k: None
        )
    img2dataset.download(**kwargs)


def download_partition(task: PartitionTask) -> PartitionResult:
    """Download one partition with img2dataset unless its marker says it is done."""
    out = Path(task.output_dir)
    marker = read_done_marker(out)
    if marker is not None and marker.get("fingerprint") == task.fingerprint:
        return _result_from_marker(task.index, marker, skipped=True)
    if multiprocessing.current_process().daemon:
        raise RuntimeError(
            "this Dask worker process is daemonic and cannot start img2dataset's processes; "
            "start external workers with DASK_DISTRIBUTED__WORKER__DAEMON=False (or "
            "`dask worker --no-nanny`)"
        )
    shutil.rmtree(out, ignore_errors=True)  # a partial partition is redone from scratch
    t0 = time.perf_counter()
    _run_img2dataset(url_list=task.input_path, output_folder=str(out), **task.options)
    rows, successes, reasons = 0, 0, Counter()
    for stats_file in sorted(out.glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())
        rows += int(stats["count"])
        successes += int(stats["successes"])
        for status, n in stats.get("status_dict", {}).items():
            if status != "success":
                reasons[normalise_reason(status)] += int(n)
    if rows < task.rows:
        # img2dataset gives up on a shard (worker crash, disk full) after its own retries
        # without writing stats; leave the partition unmarked so a re-run redoes it.
        raise RuntimeError(
            f"partition {task.index}: img2dataset reported {rows} of {task.rows} rows (a shard "
            f"failed as a whole); see the log above, then re-run to retry"
        )
    shards = sorted(p.name for p in out.glob("*.tar"))
    result = PartitionResult(
        task.index, rows, successes, dict(reasons), shards, round(time.perf_counter() - t0, 3)
    )
    done = {"fingerprint": task.fingerprint, **asdict(result)}
    done.pop("skipped")
    tmp = out / (DONE_MARKER + ".tmp")
    tmp.write_text(json.dumps(done, indent=1))
    os.replace(tmp, out / DONE_MARKER)  # last: the partition is finished
    return result


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


def partition_dir(shards_dir: str | Path, index: int) -> Path:
    return Path(shards_dir) / f"part-{index:05d}"


def sample_id(shard: str | Path, key: str) -> str:
    """A sample id unique across partitions: img2dataset numbers keys per partition, so
    ``part-00000/0000003`` and ``part-00001/0000003`` are different samples."""
    return f"{Path(shard).parent.name}/{key}"


def list_shards(shards_dir: str | Path) -> list[Path]:
    """Every finished ``.tar`` in global order: partition, then shard (only partitions with
    a ``_done.json``)."""
    out = []
    for part in sorted(Path(shards_dir).glob("part-[0-9]*")):
        marker = read_done_marker(part)
        if marker is not None:
            out.extend(part / name for name in sorted(marker["shards"]))
    return out


def _img2dataset_options(cfg: Gap3dConfig, extra_cols: list[str]) -> dict[str, Any]:
    d = cfg.data
    return {
        "input_format": "parquet",
        "url_col": d.url_col,
        "caption_col": d.caption_col,
        "save_additional_columns": list(extra_cols) or None,
        "output_format": "webdataset",
        "number_sample_per_shard": d.samples_per_shard,
        "image_size": d.download_image_size,
        "resize_mode": d.resize_mode,
        "max_image_area": float(d.max_image_pixels),
        "processes_count": d.download_processes,
        "thread_count": d.download_threads,
        "timeout": d.timeout_s,
        "retries": d.retries,
        # None = img2dataset's X-Robots-Tag opt-out list (noai, noimageai, ...): see url_policy
        "disallowed_header_directives": img2dataset_header_directives(
            d.disallowed_header_directives
        ),
        "encode_format": d.encode_format,
        # img2dataset's quality scale is per format: PNG takes a zlib level 0-9 (lossless)
        "encode_quality": 3 if d.encode_format == "png" else 95,
        # off: keep the served bytes (alpha channel included); img2dataset's re-encode mattes
        # RGBA onto white, which would bake one alpha policy into the shards
        "disable_all_reencoding": not d.download_reencode,
        "enable_wandb": False,
    }


def _extra_columns(cfg: Gap3dConfig) -> list[str]:
    from gap3d.pipeline.demo_data import DEMO_COLUMNS

    cols = list(DEMO_COLUMNS) if cfg.data.source == "demo" else []
    return cols + [c for c in cfg.data.extra_cols if c not in cols]


def plan_partitions(cfg: Gap3dConfig) -> list[PartitionTask]:
    """Validate the URL list, write the partition inputs that are not done yet, return tasks."""
    import numpy as np
    import pyarrow.parquet as pq

    d = cfg.data
    extra = _extra_columns(cfg)
    table = read_url_list(cfg.url_list_path, d.url_col, d.caption_col, extra)
    table, rejected = keep_web_urls(table, d.url_col)
    if rejected["rejected"]:
        print(
            f"download: left out {rejected['rejected']} row(s) of {cfg.url_list_path} whose URL "
            f"is not http(s) (first: {rejected['examples'][0]['url']!r})"
        )
    if table.num_rows == 0:
        raise ValueError(f"URL list {cfg.url_list_path} has no http:// or https:// URLs")
    table = _truncate_captions(table, d.caption_col, d.max_caption_chars)
    options = _img2dataset_options(cfg, extra)
    n_parts = -(-table.num_rows // d.partition_rows)
    bounds = [
        np.arange(lo, min(lo + d.partition_rows, table.num_rows))
        for lo in range(0, table.num_rows, d.partition_rows)
    ]
    inputs = cfg.shards_dir / INPUTS_DIR
    inputs.mkdir(parents=True, exist_ok=True)
    write_rejected(inputs, rejected)
    opts_digest = json.dumps(options, sort_keys=True)
    tasks = []
    for i, idx in enumerate(bounds):
        # take() copies the rows into fresh, zero-offset buffers, so the digest depends only on
        # the partition's content, not on how much of the list came after it
        part = table.take(idx)
        fp = hashlib.sha256((_table_digest(part) + opts_digest).encode()).hexdigest()[:16]
        input_path = inputs / f"part-{i:05d}.parquet"
        out = partition_dir(cfg.shards_dir, i)
        marker = read_done_marker(out)
        if marker is None or marker.get("fingerprint") != fp:
            pq.write_table(part, input_path)
        tasks.append(
            PartitionTask(i, str(input_path.resolve()), str(out.resolve()), fp, options, len(idx))
        )
    # Partitions beyond the current count belong to an older, longer URL list (a store
    # encoded from them will refuse the change: see gap3d.pipeline.sources).
    for stale in cfg.shards_dir.glob("part-[0-9]*"):
        if int(stale.name.split("-")[1]) >= n_parts:
            shutil.rmtree(stale, ignore_errors=True)
    for stale in inputs.glob("part-[0-9]*.parquet"):
        if int(stale.stem.split("-")[1]) >= n_parts:
            stale.unlink()
    return tasks


def download(cfg: Gap3dConfig) -> DownloadReport:
    """Run the download stage for ``cfg``; returns (and writes) the report.

    For ``data.source == "demo"`` the asset library is built first if needed and served on
    ``data.demo.host:port`` for the duration of the stage (the workers must run on this host).
    """
    from gap3d.pipeline.cluster import daemonic_workers, gather_with_progress, open_client

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # inherited by local workers
    t0 = time.perf_counter()
    if cfg.data.source == "demo":
        from gap3d.pipeline.demo_data import build_demo_library

        build_demo_library(cfg)
    tasks = plan_partitions(cfg)
    results: dict[int, PartitionResult] = {}
    todo = []
    for t in tasks:
        marker = read_done_marker(Path(t.output_dir))
        if marker is not None and marker.get("fingerprint") == t.fingerprint:
            results[t.index] = _result_from_marker(t.index, marker, skipped=True)
        else:
            todo.append(t)
    task_failures: list[dict[str, Any]] = []
    if todo:
        print(
            f"download: {len(todo)} of {len(tasks)} partitions to fetch "
            f"({len(tasks) - len(todo)} already done)"
        )
        with contextlib.ExitStack() as stack:
            if cfg.data.source == "demo":
                from gap3d.pipeline.server import serve_directory

                demo = cfg.data.demo
                stack.enter_context(serve_directory(cfg.assets_dir, demo.host, demo.port))
            client = stack.enter_context(open_client(cfg.cluster, purpose="download"))
            daemonic = daemonic_workers(client)
            if daemonic:
                raise RuntimeError(
                    f"Dask workers {daemonic} run as daemonic processes, which cannot start "
                    "img2dataset's processes; restart them with "
                    "DASK_DISTRIBUTED__WORKER__DAEMON=False (or `dask worker --no-nanny`)"
                )
            futures = [
                client.submit(
                    download_partition,
                    t,
                    key=f"download-part-{t.index:05d}-{t.fingerprint}",
                    pure=False,
                    retries=0,
                )
                for t in todo
            ]
            done, failures = gather_with_progress(futures, desc="download partitions", unit="part")
        for r in done:
            if r is not None:
                results[r.index] = r
        for f in failures:
            task_failures.append({"partition": todo[f.index].index, **f.to_dict()})
    else:
        print(f"download: all {len(tasks)} partitions already done")
    parts = [results[i] for i in sorted(results)]
    rejected = read_rejected(cfg.shards_dir / INPUTS_DIR)  # rows never handed to img2dataset
    reasons: Counter[str] = Counter(rejected["by_reason"])
    for p in parts:
        reasons.update(p.failures)
    report = DownloadReport(
        url_list=str(cfg.url_list_path),
        shards_dir=str(cfg.shards_dir),
        rows=sum(p.rows for p in parts) + int(rejected["rejected"]),
        successes=sum(p.successes for p in parts),
        failures_by_reason=dict(reasons.most_common()),
        n_shards=sum(len(p.shards) for p in parts),
        seconds=round(time.perf_counter() - t0, 3),
        partitions=parts,
        task_failures=task_failures,
    )
    (cfg.shards_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1))
    return report


def print_summary(report: DownloadReport) -> None:
    print(
        f"download: {report.successes}/{report.rows} images in {report.n_shards} shards "
        f"({report.failures} failed) in {report.seconds:.1f}s -> {report.shards_dir}"
    )
    for reason, n in report.failures_by_reason.items():
        print(f"  {n:6d}  {reason}")
    for f in report.task_failures:
        print(f"  partition {f['partition']} FAILED: {f['error']}")
    if report.task_failures:
        print("  re-run the same command to retry the failed partitions")


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    """``gap3d download``: 0 when every partition finished (some URLs may have failed)."""
    report = download(cfg)
    print_summary(report)
    return 0 if report.complete else 1
