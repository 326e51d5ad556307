"""Kill ``gap3d cache`` with SIGKILL after its first commit, re-run, compare with a clean run."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
from _kill import run_and_kill_when

from gap3d.pipeline.encode import cache
from gap3d.store import FeatureStore


def _markers(store_path: Path) -> list[Path]:
    """Commit records on disk: one zarr group (``commits/shard-NNNNNN/zarr.json``) per shard."""
    return sorted((store_path / "commits").glob("shard-*/zarr.json"))


def _kill_after_first_commit(argv: list[str], store_path: Path, log: Path) -> int:
    """Run ``argv`` in its own process group; SIGKILL it once one shard has committed."""
    return run_and_kill_when(
        argv, lambda: store_path.is_dir() and bool(_markers(store_path)), log, 240, poll=0.005
    )


def test_kill_and_resume_matches_clean_run(tiny_data, inproc_client, tmp_path: Path) -> None:
    n_shards = len(tiny_data.shards)
    killed = tmp_path / "killed.zarr"
    argv = [
        sys.executable,
        "-m",
        "gap3d.cli",
        "cache",
        "--config",
        "tiny",
        *tiny_data.cli_overrides(),
        f"store.path={killed}",
        # Worker threads inside the CLI process: one SIGKILL takes the whole run down at once
        # (and spares the test a worker process start).
        "cluster.processes=false",
    ]
    rc = _kill_after_first_commit(argv, killed, tmp_path / "killed.log")
    assert rc == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    committed = FeatureStore.open(killed).committed_shards()
    assert 1 <= len(committed) < n_shards, "the kill came too late to test a resume"

    resumed = cache(tiny_data.config(**{"store.path": str(killed)}), client=inproc_client)
    assert resumed.ok and resumed.skipped == committed
    assert sorted(r.shard_id for r in resumed.done) == sorted(set(range(n_shards)) - set(committed))

    clean_path = tmp_path / "clean.zarr"
    clean = cache(tiny_data.config(**{"store.path": str(clean_path)}), client=inproc_client)
    assert clean.ok and len(clean.done) == n_shards

    a, b = FeatureStore.open(killed), FeatureStore.open(clean_path)
    assert a.committed_shards() == b.committed_shards() == list(range(n_shards))
    for s in range(n_shards):
        ma, mb = a.commit_info(s), b.commit_info(s)
        for k in ("n_samples", "n_valid", "reasons", "splits"):
            assert ma[k] == mb[k], (s, k)
    for name in a.manifest["arrays"]:
        x, y = np.asarray(a.raw(name)[:]), np.asarray(b.raw(name)[:])
        assert x.shape == y.shape and np.array_equal(x, y), name
    keys = a.read(a.indices(valid_only=False), fields=["key"])["key"]
    assert len(keys) == len(set(keys)) == tiny_data.successes  # no duplicate, none missing
    assert json.dumps(a.invalid_counts()) == json.dumps(b.invalid_counts())
