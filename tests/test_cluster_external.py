"""``gap3d cache --scheduler ADDR`` against a ``dask scheduler`` + ``dask worker`` started as
separate processes on 127.0.0.1, the way a SLURM or Kubernetes cluster is attached."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gap3d.cli import main as cli_main
from gap3d.pipeline.server import free_port
from gap3d.pipeline.workers import load_count
from gap3d.store import FeatureStore

DASK = str(Path(sys.executable).with_name("dask"))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def external_cluster(tmp_path: Path) -> Iterator[str]:
    """Scheduler and one worker (advertising ``GPU=1``) as subprocesses; yields the address."""
    from distributed import Client

    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    common = {"cwd": os.getcwd(), "env": dict(os.environ), "stdin": subprocess.DEVNULL}
    sched = subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=(logs / "scheduler.log").open("w"),
        stderr=subprocess.STDOUT,
        **common,
    )
    worker = subprocess.Popen(
        [
            DASK,
            "worker",
            addr,
            "--host",
            "127.0.0.1",
            "--nworkers",
            "1",
            "--nthreads",
            "1",
            "--memory-limit",
            "2GiB",
            "--resources",
            "GPU=1",
            "--no-dashboard",
        ],
        stdout=(logs / "worker.log").open("w"),
        stderr=subprocess.STDOUT,
        **common,
    )
    try:
        with Client(addr, timeout="30s") as c:
            c.wait_for_workers(1, timeout=60)
        yield addr
    finally:
        _stop(worker)
        _stop(sched)


def test_cache_on_external_cluster(tiny_data, external_cluster: str, tmp_path: Path) -> None:
    from distributed import Client

    store_path = tmp_path / "ext.zarr"
    argv = [
        "cache",
        "--config",
        "tiny",
        "--scheduler",
        external_cluster,
        *tiny_data.cli_overrides(),
        f"store.path={store_path}",
        "cluster.gpu_resources=true",
    ]
    assert cli_main(argv) == 0
    store = FeatureStore.open(store_path)
    assert store.missing_shards() == [] and store.n_shards == len(tiny_data.shards)
    assert len(store.indices()) == tiny_data.successes
    with Client(external_cluster) as c:
        loads = c.run(load_count)
        # Tasks asked for GPU=1, and the scheduler placed them on the worker that has it.
        resources = [w["resources"] for w in c.scheduler_info()["workers"].values()]
    assert list(loads.values()) == [1], loads  # the external worker loaded the models once
    assert resources == [{"GPU": 1.0}] or resources == [{"GPU": 1}]
    # The cluster is left running (we attached, we did not start it).
    with Client(external_cluster) as c:
        assert len(c.scheduler_info()["workers"]) == 1
