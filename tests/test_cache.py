"""The encode stage: bad inputs through the whole stage, and the tiny demo end to end."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest_pipeline import (
    MAX_CAPTION,
    MAX_PIXELS,
    bad_cases,
    tiny_config,
    write_shard_tar,
    write_truncated_tar,
)

from gap3d.cli import main as cli_main
from gap3d.pipeline.decode import decode_sample
from gap3d.pipeline.encode import cache
from gap3d.pipeline.workers import get_encoders
from gap3d.store import FeatureStore
from gap3d.store import describe as inspect_stage

KEEP = 5  # complete samples before the damage in the truncated tar


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory: pytest.TempPathFactory, inproc_client):
    """The bad-input corpus (one clean-but-dirty tar + one truncated tar) through ``cache``."""
    root = tmp_path_factory.mktemp("bad")
    cases = bad_cases()
    cfg = tiny_config(
        root,
        **{
            "data.samples_per_shard": 32,
            "data.max_image_pixels": MAX_PIXELS,
            "data.max_caption_chars": MAX_CAPTION,
            "cluster.processes": False,
        },
    )
    shards = [
        write_shard_tar(root / "shards" / "00000.tar", cases),
        write_truncated_tar(root / "shards" / "00001.tar", cases, keep_complete=KEEP),
    ]
    report = cache(cfg, client=inproc_client, shards=shards)
    return cfg, cases, report, inproc_client


def test_bad_inputs_are_marked_not_fatal(bad_run) -> None:
    cfg, cases, report, _ = bad_run
    assert report.ok, report.failed
    assert [r.shard_id for r in report.done] == [0, 1]
    assert report.done[0].tar_error is None and report.done[1].tar_error
    store = FeatureStore.open(cfg.store_path)
    assert store.committed_shards() == [0, 1]
    n0 = len(cases)
    rows = store.read(np.arange(n0))
    assert rows["key"] == [c.key for c in cases]  # tar order kept
    assert store.read(np.arange(n0), fields=["reason"])["reason"] == [c.reason for c in cases]
    for i, c in enumerate(cases):
        tokens, mask = rows["image_tokens"][i], rows["prompt_mask"][i]
        if c.reason:
            assert not rows["valid"][i] and not tokens.any() and not mask.any()
        else:
            assert rows["valid"][i] and np.abs(tokens).sum() > 0 and mask.any()
            assert rows["thumbnail"][i].any()
            assert rows["split"][i] == c.split
            for k in c.meta_keys:
                assert k in rows["meta"][i], (c.key, rows["meta"][i])
    # The truncated shard: the samples before the damage, then the cut one marked.
    S = store.samples_per_shard
    info1 = store.commit_info(1)
    assert info1["n_samples"] == KEEP + 1
    r1 = store.read(np.arange(S, S + KEEP + 1), fields=["key", "reason"])
    assert r1["key"] == [c.key for c in cases[: KEEP + 1]]
    assert r1["reason"] == [c.reason for c in cases[:KEEP]] + ["sample_truncated"]


def test_stored_features_match_a_direct_encoder_call(bad_run) -> None:
    cfg, cases, _, client = bad_run
    store = FeatureStore.open(cfg.store_path)
    case = next(c for c in cases if c.key == "ok_jpg")
    d = decode_sample({"__key__": case.key, **case.entries}, MAX_PIXELS, MAX_CAPTION)
    enc = get_encoders(cfg.prompt_encoder, cfg.image_encoder)
    want_tok = enc.image.encode([d.image]).numpy()[0]
    want_lat = enc.prompt.encode([d.caption]).hidden.numpy()[0]
    row = store.read(0)
    np.testing.assert_allclose(row["image_tokens"], want_tok, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(row["prompt_latents"], want_lat, rtol=2e-3, atol=2e-3)
    assert row["meta"]["asset_id"] == "a1"


def test_invalid_counts_in_manifest_and_inspect(bad_run, capsys: pytest.CaptureFixture) -> None:
    cfg, cases, report, _ = bad_run
    want = Counter(c.reason for c in cases if c.reason)
    want.update(c.reason for c in cases[:KEEP] if c.reason)
    want["sample_truncated"] += 1
    store = FeatureStore.open(cfg.store_path)
    assert store.manifest["cache"]["invalid_counts"] == dict(want)
    assert report.store_invalid == dict(want)
    assert store.stats_info() is not None and not store.stats_info()["stale"]
    args = argparse.Namespace(store=str(cfg.store_path), json=True)
    assert inspect_stage.cli_main(cfg, args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"]["invalid_reasons"] == dict(want)
    assert out["shards"]["n_missing"] == 0


def test_rerun_skips_and_failed_shard_exits_nonzero(bad_run, tmp_path: Path) -> None:
    cfg, cases, _, client = bad_run
    again = cache(
        cfg,
        client=client,
        shards=[
            write_shard_tar(tmp_path / "a.tar", cases),
            write_truncated_tar(tmp_path / "b.tar", cases, KEEP),
        ],
    )
    assert again.ok and again.skipped == [0, 1] and not again.done
    # A grown shard list with one unreadable tar: that shard fails, the other one commits.
    (tmp_path / "junk.tar").write_bytes(b"<html>not a tar</html>" * 40)
    more = cache(
        cfg,
        client=client,
        shards=[
            tmp_path / "a.tar",
            tmp_path / "b.tar",
            tmp_path / "junk.tar",
            write_shard_tar(tmp_path / "c.tar", cases[:3]),
        ],
    )
    assert list(more.failed) == [2] and "junk.tar" in more.failed[2]
    assert [r.shard_id for r in more.done] == [3]
    assert "re-run" in more.summary()
    assert FeatureStore.open(cfg.store_path).committed_shards() == [0, 1, 3]


def test_no_shards_says_run_download(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, **{"cluster.processes": False})
    with pytest.raises(FileNotFoundError, match="gap3d download"):
        cache(cfg, shards=[])
    assert cli_main(["cache", "--config", "tiny", f"workdir={tmp_path}"]) == 1


def test_tiny_demo_end_to_end(tiny_data, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Loopback server -> img2dataset -> shards (fixture) -> LocalCluster worker processes ->
    store; models load once per worker process; ``gap3d inspect`` shows the store complete."""
    from gap3d.pipeline.cluster import open_client
    from gap3d.pipeline.decode import read_tar
    from gap3d.pipeline.workers import load_count

    store_path = tmp_path / "e2e.zarr"
    cfg = tiny_data.config(**{"store.path": str(store_path)})
    with open_client(cfg.cluster, purpose="test") as client:
        report = cache(cfg, client=client)
        loads = client.run(load_count)
    assert report.ok and len(report.done) == len(tiny_data.shards) >= 4
    assert list(loads.values()) == [1]  # one worker process, one load for all its shards
    assert {r.worker_pid for r in report.done} != {os.getpid()}
    assert report.n_samples == report.n_valid == tiny_data.successes

    store = FeatureStore.open(store_path)
    first = read_tar(tiny_data.shards[0])
    rows = store.read(np.arange(len(first.samples)), fields=["key", "caption", "meta", "split"])
    assert rows["key"] == [s["__key__"] for s in first.samples]
    assert rows["caption"] == [s["txt"].decode() for s in first.samples]
    assert all("asset_id" in m and "shape" in m for m in rows["meta"])
    splits = {s for i in store.indices() for s in store.read([i], fields=["split"])["split"]}
    assert splits <= {"train", "heldout"}

    capsys.readouterr()
    argv = ["inspect", str(store_path), "--config", "tiny", "--json"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shards"]["n_missing"] == 0
    assert out["shards"]["n_committed"] == len(tiny_data.shards)
    assert out["samples"]["n_valid"] == tiny_data.successes
    assert out["stats"]["present"] and not out["stats"]["stale"]


def test_encoder_error_marks_only_that_sample(bad_run, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample the image encoder raises on becomes ``encode_failed``; the rest are encoded
    by the real (tiny) encoders."""
    from gap3d.pipeline.workers import encode_samples

    cfg, cases, _, _ = bad_run
    decoded = [
        decode_sample({"__key__": c.key, **c.entries}, MAX_PIXELS, MAX_CAPTION) for c in cases[:4]
    ]
    enc = get_encoders(cfg.prompt_encoder, cfg.image_encoder)
    real = enc.image.encode
    poison = decoded[1].image

    def flaky(images):
        if any(im is poison for im in images):
            raise RuntimeError("encoder cannot handle this image")
        return real(images)

    monkeypatch.setattr(enc.image, "encode", flaky)
    data = encode_samples(enc, decoded)
    assert data.reason == ["", "encode_failed", "", ""]
    assert "cannot handle" in data.meta[1]["encode_error"]
    assert not data.image_tokens[1].any() and data.image_tokens[[0, 2, 3]].any()
    np.testing.assert_allclose(data.image_tokens[0], real([decoded[0].image]).numpy()[0], atol=1e-5)


def test_gpu_resources_without_gpu_workers_is_a_clear_error(bad_run, tmp_path: Path) -> None:
    cfg, cases, _, client = bad_run
    gpu_cfg = tiny_config(tmp_path, **{"cluster.gpu_resources": True})
    with pytest.raises(RuntimeError, match="--resources GPU=1"):
        cache(gpu_cfg, client=client, shards=[write_shard_tar(tmp_path / "a.tar", cases[:2])])
