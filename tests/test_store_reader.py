"""The store's readers (fastread, tensorstore, zarr-python) against zarr-python's own reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store import make_shard, make_spec
from zarr.codecs import GzipCodec

from gap3d.store import FeatureStore
from gap3d.store.fastread import plan_array, read_rows
from gap3d.store.schema import FEATURE_ARRAYS, ROW_ARRAYS


def _store(tmp_path: Path, kind: str, encoding: str, compression: str) -> FeatureStore:
    """Shard 0 partly filled (with an invalid = all-zero row), shard 1 never written,
    shard 2 full: rows of every kind a reader meets (data, fill value chunks, no file)."""
    spec = make_spec(kind, encoding, n_shards=3, samples_per_shard=6, compression=compression)
    store = FeatureStore.create(tmp_path / f"{kind}-{encoding}-{compression}.zarr", spec)
    store.write_shard(0, make_shard(spec, 4, seed=1, invalid=(1,)))
    store.write_shard(2, make_shard(spec, 6, seed=2))
    return FeatureStore.open(store.url)


def _dir(store: FeatureStore, name: str) -> Path:
    return Path(store.location.path) / name


@pytest.mark.parametrize(
    "kind,encoding,compression",
    [
        ("tiny", "float16", "none"),
        ("tiny", "int8", "none"),
        ("tiny", "int8", "zstd"),
        ("demo", "float16", "zstd"),
        ("demo", "float16", "none"),
    ],
)
def test_matches_zarr(tmp_path: Path, kind: str, encoding: str, compression: str) -> None:
    store = _store(tmp_path, kind, encoding, compression)
    assert store.manifest["compression"] == compression
    rng = np.random.default_rng(0)
    n = len(store)
    selections = [
        rng.integers(0, n, 25),  # unsorted, with repeats, across written/unwritten shards
        np.arange(6, 12),  # the shard that has no file
        np.array([1, 4, 5]),  # an invalid (zero) row and unused tail rows of shard 0
        np.zeros(0, np.int64),
    ]
    for name in ROW_ARRAYS:
        if name not in store.manifest["arrays"]:
            continue
        plan = plan_array(_dir(store, name))
        assert plan is not None, f"{name} should be readable directly"
        assert plan.zstd == (compression == "zstd" or name not in FEATURE_ARRAYS)
        for rows in selections:
            expected = store.raw(name).oindex[rows]
            got = read_rows(plan, rows)
            assert got.dtype == expected.dtype and np.array_equal(got, expected), name
    # the decoded batch of the whole read path is the same through every reader
    rows = np.sort(rng.choice(n, 10, replace=False))
    ref = FeatureStore.open(store.url, reader="zarr").read(rows)
    for backend in ("fastread", "tensorstore"):
        got = FeatureStore.open(store.url, reader=backend).read(rows)
        for k, v in ref.items():
            if isinstance(v, np.ndarray):
                assert v.dtype == got[k].dtype and np.array_equal(v, got[k]), (backend, k)
            else:
                assert v == got[k], (backend, k)
        half = FeatureStore.open(store.url, reader=backend).read(rows, floats="float16")
        assert half["image_tokens"].dtype == np.float16
        np.testing.assert_allclose(half["image_tokens"], ref["image_tokens"], rtol=1e-3, atol=1e-3)


def test_unsupported_arrays_fall_back(tmp_path: Path) -> None:
    store = _store(tmp_path, "tiny", "float16", "none")
    assert plan_array(_dir(store, "caption")) is None  # text column: zarr reads it
    assert plan_array(_dir(store, "valid")) is None  # one chunk per shard, not per row
    assert plan_array(tmp_path / "nowhere") is None
    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    g.create_array("gz", shape=(4, 3), dtype="float32", chunks=(1, 3), shards=(2, 3),
                   compressors=[GzipCodec()])  # fmt: skip
    g.create_array("wide", shape=(4, 6), dtype="float32", chunks=(1, 3), shards=(2, 6))
    assert plan_array(tmp_path / "other.zarr" / "gz") is None
    assert plan_array(tmp_path / "other.zarr" / "wide") is None
    # a v2 chunk key encoding is left to zarr
    meta = json.loads((_dir(store, "image_tokens") / "zarr.json").read_text())
    meta["chunk_key_encoding"] = {"name": "v2", "configuration": {"separator": "."}}
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "zarr.json").write_text(json.dumps(meta))
    assert plan_array(tmp_path / "v2") is None
    # mixing direct and zarr reads in one batch gives the same values
    reader = FeatureStore.open(store.url)
    reader.reader._plans["prompt_mask"] = None
    rows = reader.indices()
    assert np.array_equal(
        reader.read(rows, fields=["prompt_mask"])["prompt_mask"],
        store.read(rows, fields=["prompt_mask"])["prompt_mask"],
    )


def test_damaged_shard_is_reported(tmp_path: Path) -> None:
    store = _store(tmp_path, "tiny", "float16", "none")
    plan = plan_array(_dir(store, "image_tokens"))
    assert plan is not None
    f = Path(plan.shard_file(2))
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF  # flip a bit of the index: the crc32c no longer matches
    f.write_bytes(bytes(raw))
    with pytest.raises(OSError, match="checksum"):
        read_rows(plan, np.array([12]))
    f.write_bytes(bytes(raw[:20]))  # truncated below the index size
    with pytest.raises(OSError, match="shorter"):
        read_rows(plan, np.array([12]))
    with pytest.raises(IndexError):
        read_rows(plan, np.array([len(store)]))
    with pytest.raises(ValueError, match="C-contiguous"):
        read_rows(plan, np.array([0]), out=np.zeros((2, 3)))


def test_cast_and_rewrite(tmp_path: Path) -> None:
    """Casting while reading is exact; a shard rewritten after a read is read anew (the
    per-process cache of open shard files checks the file on every use)."""
    store = _store(tmp_path, "demo", "float16", "none")
    plan = plan_array(_dir(store, "image_tokens"))
    assert plan is not None
    rows = np.array([13, 0, 12, 3])
    as_f32 = read_rows(plan, rows, dtype=np.float32)
    assert as_f32.dtype == np.float32
    assert np.array_equal(as_f32, read_rows(plan, rows).astype(np.float32))
    with pytest.raises(ValueError, match="losslessly"):
        read_rows(plan, rows, dtype=np.int8)
    before = store.read([12, 13])["image_tokens"]
    writer = FeatureStore.open(store.url, "r+")
    spec = make_spec("demo", "float16", n_shards=3, samples_per_shard=6, compression="none")
    writer.write_shard(2, make_shard(spec, 6, seed=99))
    after = store.read([12, 13])["image_tokens"]
    assert not np.array_equal(before, after)
    assert np.array_equal(after, store.raw("image_tokens")[12:14].astype(np.float32))


def test_forked_workers_reopen(tmp_path: Path) -> None:
    """The parent's mapped shard files are not reused in forked DataLoader workers."""
    from gap3d.trainer.data import StoreBatchDataset, make_loader

    store = _store(tmp_path, "tiny", "float16", "none")
    rows = store.indices()
    ds = StoreBatchDataset(store.url)
    expected = ds[rows.tolist()]  # fills this process's cache of open shard files
    batches = [rows[i : i + 3].tolist() for i in range(0, len(rows), 3)]
    loader = make_loader(ds, batches, num_workers=2, multiprocessing_context="fork")  # type: ignore[arg-type]
    got = {k: np.concatenate([b[k].numpy() for b in loader]) for k in expected}
    for k, v in expected.items():
        assert np.array_equal(got[k], v.numpy()), k
