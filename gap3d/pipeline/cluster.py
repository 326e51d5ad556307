"""Dask for the pipeline stages: one way to get a client, one way to wait for tasks.

``open_client`` either starts a ``LocalCluster`` for the duration of a stage (and closes it)
or attaches to ``cluster.scheduler`` (and leaves that cluster alone). ``gather_with_progress``
waits for futures with progress (a bar on a terminal, plain lines in a log) and *collects* failures instead of raising on the first one,
so one bad shard never hides the results of the others.

Worker processes and child processes: img2dataset starts processes of its own (a logger and a
pool) inside each download task. Dask's worker processes are daemonic by default, and a
daemonic process may not have children, so the LocalCluster started here runs non-daemonic
workers (``distributed.worker.daemon: False``). Workers of an external cluster need the same:
start them with ``DASK_DISTRIBUTED__WORKER__DAEMON=False dask worker tcp://...`` (or
``dask worker --no-nanny``, whose worker is the main process of its own).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dask

from gap3d.config import ClusterConfig
from gap3d.progress import Progress


@dataclass
class TaskFailure:
    """A task that raised (or was cancelled, or lost its worker)."""

    index: int  # position in the list passed to gather_with_progress
    key: str  # the Dask key
    error: str  # "ExceptionType: message"
    traceback: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "key": self.key,
            "error": self.error,
            "traceback": self.traceback,
        }


def _dashboard_address(value: str) -> str | None:
    # "" / "none" / "off" switch the dashboard off.
    return None if value.strip().lower() in ("", "none", "off", "false") else value


def _print_dashboard(client: Any, purpose: str) -> None:
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:  # noqa: BLE001 - cosmetic only; never fail a stage over the link
        services = {}
    if "dashboard" in services:
        print(f"[{purpose}] Dask dashboard: {client.dashboard_link}")
    else:
        print(f"[{purpose}] Dask dashboard not running (it needs `pip install bokeh>=3.1`)")


@contextmanager
def open_client(
    cluster_cfg: ClusterConfig, *, purpose: str, connect_timeout_s: float = 20.0
) -> Iterator[Any]:
    """A ``distributed.Client`` for one pipeline stage.

    With ``cluster_cfg.scheduler`` set, attach to that scheduler and only close the client on
    exit. Otherwise start a ``LocalCluster`` on 127.0.0.1 with ``n_workers``,
    ``threads_per_worker``, ``memory_limit``, ``processes`` and ``dashboard_address`` (and
    ``resources={"GPU": 1}`` per worker when ``gpu_resources`` is true), with non-daemonic
    worker processes so tasks may start processes, and shut it down on exit. ``purpose``
    (e.g. ``"download"``) labels the printed dashboard link; ``connect_timeout_s`` bounds the
    wait for an external scheduler.
    """
    from distributed import Client, LocalCluster

    if cluster_cfg.scheduler:
        try:
            client = Client(cluster_cfg.scheduler, timeout=f"{connect_timeout_s}s")
        except (OSError, TimeoutError) as e:
            raise RuntimeError(
                f"cannot reach the Dask scheduler at {cluster_cfg.scheduler} ({e}); start it "
                "(`dask scheduler`) or drop cluster.scheduler / --scheduler to run locally"
            ) from e
        try:
            n = len(client.scheduler_info().get("workers", {}))
            print(f"[{purpose}] attached to {cluster_cfg.scheduler} ({n} workers)")
            _print_dashboard(client, purpose)
            yield client
        finally:
            client.close()  # never shut down a cluster we did not start
        return

    kwargs: dict[str, Any] = {
        "n_workers": cluster_cfg.n_workers,
        "threads_per_worker": cluster_cfg.threads_per_worker,
        "memory_limit": cluster_cfg.memory_limit,
        "processes": cluster_cfg.processes,
        "dashboard_address": _dashboard_address(cluster_cfg.dashboard_address),
        "silence_logs": logging.WARNING,
    }
    if cluster_cfg.processes:
        kwargs["host"] = "127.0.0.1"  # threads talk in-process; processes only over loopback
    if cluster_cfg.gpu_resources:
        kwargs["resources"] = {"GPU": 1}
    # The nanny reads this when it starts each worker process (see module docstring).
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(**kwargs)
    try:
        client = Client(cluster)
        try:
            kind = "processes" if cluster_cfg.processes else "threads"
            print(
                f"[{purpose}] LocalCluster: {cluster_cfg.n_workers} worker(s) x "
                f"{cluster_cfg.threads_per_worker} thread(s) ({kind})"
            )
            _print_dashboard(client, purpose)
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def _process_is_daemon() -> bool:
    import multiprocessing

    return bool(multiprocessing.current_process().daemon)


def daemonic_workers(client: Any) -> list[str]:
    """Addresses of workers whose process is daemonic (those cannot start child processes)."""
    flags = client.run(_process_is_daemon)
    return sorted(addr for addr, daemon in flags.items() if daemon)


def gather_with_progress(
    futures: Sequence[Any],
    *,
    desc: str,
    unit: str = "task",
    sizes: Sequence[int] | None = None,
) -> tuple[list[Any], list[TaskFailure]]:
    """Wait for ``futures`` with a progress bar; return ``(results, failures)``.

    ``results[i]`` is the result of ``futures[i]`` or ``None`` where it failed; ``failures``
    lists every failed task (exception text and traceback) and never raises on their behalf.
    With ``sizes`` (items per task, e.g. samples per shard) the bar counts items in ``unit``,
    so its rate is a throughput; otherwise it counts tasks.
    """
    from distributed import as_completed

    index = {id(f): i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    failures: list[TaskFailure] = []
    total = sum(sizes) if sizes is not None else len(futures)
    t0 = time.perf_counter()
    n_items = 0  # samples reported by finished tasks (results with an ``n_samples`` field)
    with Progress(total, desc, unit=unit) as bar:
        for fut in as_completed(list(futures)):
            i = index[id(fut)]
            if fut.status == "finished":
                try:
                    results[i] = fut.result()
                    n_items += int(getattr(results[i], "n_samples", 0) or 0)
                except Exception as e:  # noqa: BLE001 - collected and reported below
                    failures.append(_failure(i, fut.key, e, e.__traceback__))
            elif fut.status == "cancelled":
                failures.append(
                    TaskFailure(i, str(fut.key), "CancelledError: task was cancelled", "")
                )
            else:
                exc = fut.exception()
                failures.append(_failure(i, fut.key, exc, fut.traceback()))
            extra: dict[str, Any] = {"failed": len(failures)} if failures else {}
            if n_items:
                rate = n_items / max(time.perf_counter() - t0, 1e-9)
                extra.update(samples=n_items, samples_per_s=f"{rate:.1f}")
            bar.update(sizes[i] if sizes is not None else 1, **extra)
    done = len(futures) - len(failures)
    dt = time.perf_counter() - t0
    rate = f", {n_items} samples, {n_items / dt:.1f} samples/s" if n_items and dt > 0 else ""
    print(f"{desc}: {done}/{len(futures)} tasks ok, {len(failures)} failed, {dt:.1f}s{rate}")
    return results, failures


def _failure(i: int, key: Any, exc: BaseException | None, tb: Any) -> TaskFailure:
    text = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
    tb_text = "".join(traceback.format_tb(tb)) if tb is not None else ""
    return TaskFailure(i, str(key), text, tb_text)
