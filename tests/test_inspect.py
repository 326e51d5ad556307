"""``gap3d inspect``: text and JSON reports of a feature store, and its error exits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_store import make_shard, make_spec

from gap3d.cli import main
from gap3d.config import load_config
from gap3d.store import FeatureStore
from gap3d.store.describe import _ranges, cli_main, describe


@pytest.fixture()
def store_path(tmp_path: Path) -> Path:
    spec = make_spec("tiny", "int8", n_shards=4, samples_per_shard=6)
    store = FeatureStore.create(tmp_path / "s.zarr", spec)
    store.write_shard(0, make_shard(spec, 6, seed=0, invalid=(1, 4)))
    store.write_shard(2, make_shard(spec, 3, seed=2))
    return tmp_path / "s.zarr"


def test_describe_counts(store_path: Path) -> None:
    r = describe(FeatureStore.open(store_path))
    assert r["shards"]["committed"] == [0, 2] and r["shards"]["missing"] == [1, 3]
    assert r["samples"]["n_samples"] == 9 and r["samples"]["n_valid"] == 7
    assert r["samples"]["invalid_reasons"] == {"download_failed": 2}
    assert r["samples"]["valid_by_split"] == {"train": 4, "heldout": 3}
    tok = r["arrays"]["image_tokens"]
    assert tok["shape"] == [24, 21, 64] and tok["dtype"] == "int8"
    assert tok["chunks"] == [1, 21, 64] and tok["shards"] == [6, 21, 64]
    assert tok["codecs"] == ["sharding[bytes, zstd(1)]"]
    assert tok["bytes_per_sample_decoded"] == 21 * 64 * 4
    on_disk = sum(p.stat().st_size for p in (store_path / "image_tokens").rglob("*") if p.is_file())
    assert tok["bytes_per_sample_on_disk"] == pytest.approx(on_disk / 9)
    # partial moments: valid train rows only (shard 0: rows 0, 3 train & valid; shard 2: 0, 1)
    assert r["stats"]["partial_moments_shards"] == 2
    assert r["stats"]["token_counts"] == {"cls": 4, "register": 16, "patch": 64}
    assert r["manifest"]["image_tokens_encoding"]["scheme"] == "absmax_int8_per_token"


def test_inspect_text_and_json(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(store_path), "--config", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "feature store" in text and str(store_path) in text
    assert "2/4 committed" in text and "missing: 1, 3" in text
    assert "9 written, 7 valid, 2 invalid" in text and "download_failed" in text
    assert "image_tokens" in text and "(24, 21, 64)" in text and "int8" in text
    assert "decode: image_tokens.astype('float32') * image_scale" in text
    assert "partial moments in 2 committed shards" in text

    assert main(["inspect", str(store_path), "--json", "--config", "tiny"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"]["n_committed"] == 2
    assert report["samples"]["invalid_reasons"] == {"download_failed": 2}
    assert report["manifest"]["layout"] == {
        "n_cls": 1,
        "n_registers": 4,
        "grid_h": 4,
        "grid_w": 4,
        "channels": 64,
    }


def test_inspect_memory_store(capsys: pytest.CaptureFixture[str]) -> None:
    """The report goes through zarr's storage layer only: a memory:// store works too."""
    spec = make_spec("tiny", "float16", n_shards=2, samples_per_shard=6)
    store = FeatureStore.create("memory://inspect-test/s.zarr", spec)
    store.write_shard(1, make_shard(spec, 4, seed=1))
    r = describe(FeatureStore.open("memory://inspect-test/s.zarr"))
    assert r["shards"]["committed"] == [1] and r["samples"]["n_samples"] == 4
    assert r["arrays"]["image_tokens"]["bytes_on_disk"] > 0
    assert main(["inspect", "memory://inspect-test/s.zarr", "--config", "tiny"]) == 0
    assert "1/2 committed" in capsys.readouterr().out


def test_inspect_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Args:
        store = str(tmp_path / "missing.zarr")
        json = False

    assert cli_main(load_config("tiny"), Args()) == 1
    assert "no such feature store" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert main(["inspect", str(tmp_path / "folder"), "--config", "tiny"]) == 1
    assert "not a gap3d feature store" in capsys.readouterr().err
    # without an argument the config's store path is used
    cfg = load_config("tiny", [f"store.path={tmp_path / 'nothing.zarr'}"])
    Args.store = None
    assert cli_main(cfg, Args()) == 1
    assert "nothing.zarr" in capsys.readouterr().err


def test_ranges() -> None:
    assert _ranges([]) == "none"
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert _ranges(list(np.arange(3))) == "0-2"
