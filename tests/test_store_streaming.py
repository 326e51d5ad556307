"""Store locations (URLs), streaming shard writes, commit records as zarr groups."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store import make_shard, make_spec

from gap3d.store import FeatureStore, StoreError, StoreLocation
from gap3d.store.location import redact_url


def test_location_parsing(tmp_path: Path) -> None:
    loc = StoreLocation.parse(tmp_path / "a.zarr")
    assert loc.is_local and loc.path == str(tmp_path / "a.zarr")
    assert StoreLocation.parse(f"file://{tmp_path}/a.zarr") == loc
    s3 = StoreLocation.parse("s3://bucket/pre/fix/x.zarr/")
    assert (s3.scheme, s3.path, s3.url) == (
        "s3",
        "bucket/pre/fix/x.zarr",
        "s3://bucket/pre/fix/x.zarr",
    )
    assert s3.tensorstore_kvstore("image_tokens")["path"] == "pre/fix/x.zarr/image_tokens/"
    assert StoreLocation.parse("gcs://b/x.zarr").scheme == "gs"
    for bad, msg in [
        ("s3://KEY:SECRET@bucket/x.zarr", "credentials"),
        ("s3://bucket", "bucket and a prefix"),
        ("ftp://host/x.zarr", "unsupported store scheme"),
        ("s3://bucket/x.zarr?token=1", "no query"),
    ]:
        with pytest.raises(StoreError, match=msg) as e:
            StoreLocation.parse(bad)
        assert "SECRET" not in str(e.value)
    assert (
        redact_url("https://u:p@host:8080/a/b.tar?X-Amz-Signature=abc")
        == "https://host:8080/a/b.tar"
    )


def test_memory_store_round_trip() -> None:
    spec = make_spec("tiny", "int8", n_shards=2, samples_per_shard=6)
    url = "memory://gap3d-tests/round-trip.zarr"
    store = FeatureStore.create(url, spec)
    data = make_shard(spec, 5, seed=3, invalid=(2,))
    store.write_shard(1, data)
    again = FeatureStore.open(url)  # a second handle sees the same objects
    assert again.reader_backend == "zarr" and again.committed_shards() == [1]
    got = again.read(again.indices(), fields=["caption", "image_tokens"])
    assert got["caption"] == [c for i, c in enumerate(data.caption) if i != 2]
    with pytest.raises(StoreError, match="already exists"):
        FeatureStore.create(url, spec)


def test_streaming_writer_writes_whole_files_as_rows_arrive(tmp_path: Path) -> None:
    """rows_per_file < samples_per_shard: each block of rows is one file, written as soon as
    it is full; nothing counts before the commit record."""
    spec = make_spec("tiny", "float16", n_shards=2, samples_per_shard=8, rows_per_file=2)
    store = FeatureStore.create(tmp_path / "s.zarr", spec)
    root = tmp_path / "s.zarr" / "image_tokens" / "c"

    def files() -> list[str]:  # one file per block: c/<block>/0/0
        return sorted(p.relative_to(root).parts[0] for p in root.rglob("*") if p.is_file())

    data = make_shard(spec, 7, seed=1)
    w = store.shard_writer(1).begin()
    w.add(_rows(data, 0, 3))
    assert files() == ["4"]  # block 0 of shard 1 = file 4
    assert FeatureStore.open(store.url).committed_shards() == []
    w.add(_rows(data, 3, 7))
    assert files() == ["4", "5", "6"]
    record = w.commit()
    assert files() == ["4", "5", "6", "7"]
    assert record["n_samples"] == 7
    one_go = FeatureStore.create(tmp_path / "t.zarr", spec)
    one_go.write_shard(1, data)
    for name in ("image_tokens", "prompt_latents", "thumbnail", "caption", "valid", "split"):
        assert np.array_equal(store.raw(name)[:], one_go.raw(name)[:]), name
    # a shorter rewrite leaves no rows of the longer one behind
    store.write_shard(1, make_shard(spec, 2, seed=2))
    assert files() == ["4"]
    assert not store.read(np.arange(10, 16), fields=["image_tokens"])["image_tokens"].any()


def _rows(d, lo: int, hi: int):  # noqa: ANN001, ANN202 - ShardData slice
    from gap3d.store import ShardData

    return ShardData(
        d.image_tokens[lo:hi], d.prompt_latents[lo:hi], d.prompt_mask[lo:hi], d.caption[lo:hi],
        d.key[lo:hi], d.url[lo:hi], d.split[lo:hi], d.meta[lo:hi], d.reason[lo:hi],
        d.thumbnail[lo:hi],
    )  # fmt: skip


def _write_then_die(url: str) -> None:
    store = FeatureStore.open(url, "r+")
    spec = make_spec("tiny", "float16", n_shards=2, samples_per_shard=8, rows_per_file=2)
    w = store.shard_writer(0).begin()
    w.add(make_shard(spec, 6, seed=9))  # three whole files are on disk now
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_streaming_encode_leaves_no_counted_rows(tmp_path: Path) -> None:
    spec = make_spec("tiny", "float16", n_shards=2, samples_per_shard=8, rows_per_file=2)
    store = FeatureStore.create(tmp_path / "s.zarr", spec)
    store.write_shard(0, make_shard(spec, 8, seed=0))
    store.write_shard(1, make_shard(spec, 8, seed=1))
    before = store.moments()
    p = mp.get_context("spawn").Process(target=_write_then_die, args=(store.url,))
    p.start()
    p.join(120)
    assert p.exitcode == -signal.SIGKILL
    after = FeatureStore.open(store.url)
    assert after.committed_shards() == [1]  # shard 0 was uncommitted before its rewrite began
    assert after.indices().min() >= 8 and len(after.indices()) == 8
    assert after.moments()["patch"].n < before["patch"].n
    # a re-run rewrites the shard and it counts again
    after = FeatureStore.open(store.url, "r+")
    after.write_shard(0, make_shard(spec, 8, seed=0))
    np.testing.assert_allclose(after.moments()["patch"].mean, before["patch"].mean)


def test_other_zarr_readers_open_the_store_cleanly(tmp_path: Path) -> None:
    """zarr-python lists the commit records as ordinary groups (no warning about foreign
    files), and tensorstore reads the tokens bit-identically."""
    import tensorstore as ts

    spec = make_spec("tiny", "float16", n_shards=2, samples_per_shard=6)
    store = FeatureStore.create(tmp_path / "s.zarr", spec)
    store.write_shard(0, make_shard(spec, 6, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members = dict(zarr.open_group(str(tmp_path / "s.zarr"), mode="r").members(max_depth=None))
    assert "commits/shard-000000" in members
    assert members["commits/shard-000000"].attrs["n_samples"] == 6
    t = ts.open(
        {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(tmp_path / "s.zarr" / "image_tokens")},
        }
    ).result()
    assert np.array_equal(t[:6].read().result(), store.raw("image_tokens")[:6])
