"""The encode stage: bad inputs through the whole stage, and the tiny demo end to end."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
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
from gap3d.store import FeatureStore, StoreError
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
    args = argparse.Namespace(store=str(cfg.store_path), json=True)
    assert inspect_stage.cli_main(cfg, args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"]["invalid_reasons"] == dict(want)
    assert out["shards"]["n_missing"] == 0


def test_rerun_skips_and_failed_shard_exits_nonzero(bad_run, tmp_path: Path) -> None:
    cfg, cases, _, client = bad_run
    root = Path(cfg.workdir) / "shards"
    same = [root / "00000.tar", root / "00001.tar"]
    again = cache(cfg, client=client, shards=same)
    assert again.ok and again.skipped == [0, 1] and not again.done
    # other encoder settings never take the shortcut of a complete store: they are refused
    other = tiny_config(
        Path(cfg.workdir),
        **{
            "data.samples_per_shard": 32,
            "data.max_image_pixels": MAX_PIXELS,
            "data.max_caption_chars": MAX_CAPTION,
            "cluster.processes": False,
            "image_encoder.image_size": 28,
        },
    )
    with pytest.raises(StoreError, match="image_encoder"):
        cache(other, client=client, shards=same)
    # A grown shard list with one unreadable tar: that shard fails, the other one commits.
    (tmp_path / "junk.tar").write_bytes(b"<html>not a tar</html>" * 40)
    grown = [*same, tmp_path / "junk.tar", write_shard_tar(tmp_path / "c.tar", cases[:3])]
    more = cache(cfg, client=client, shards=grown)
    assert list(more.failed) == [2] and "junk.tar" in more.failed[2]
    assert [r.shard_id for r in more.done] == [3]
    assert "re-run" in more.summary()
    assert FeatureStore.open(cfg.store_path).committed_shards() == [0, 1, 3]


def test_changed_input_shard_is_refused(tmp_path: Path, inproc_client) -> None:
    """A committed store shard whose input tar changed, was renumbered or vanished is refused
    with a message naming it; --reencode-changed re-encodes (or uncommits) exactly those."""
    from gap3d.pipeline.encode import SourceChangedError

    cases = bad_cases()
    cfg = tiny_config(tmp_path, **{"data.samples_per_shard": 32, "cluster.processes": False})
    a = write_shard_tar(tmp_path / "in" / "a.tar", cases[:4])
    b = write_shard_tar(tmp_path / "in" / "b.tar", cases[4:8])
    first = cache(cfg, client=inproc_client, shards=[a, b])
    assert first.ok and [r.shard_id for r in first.done] == [0, 1]
    rec = FeatureStore.open(cfg.store_path).commit_info(1)
    assert rec["source"]["url"] == str(b) and rec["source"]["fingerprint"]["size"] > 0

    write_shard_tar(b, cases[4:9])  # the input of shard 1 changes
    with pytest.raises(SourceChangedError, match=r"store shard 1: its input .*b\.tar changed"):
        cache(cfg, client=inproc_client, shards=[a, b])
    with pytest.raises(SourceChangedError, match=r"store shard 0: was encoded from .*a\.tar"):
        cache(cfg, client=inproc_client, shards=[b, a])  # renumbered
    with pytest.raises(SourceChangedError, match="store shard 1: .*no longer an input"):
        cache(cfg, client=inproc_client, shards=[a])  # removed
    store = FeatureStore.open(cfg.store_path)
    assert store.committed_shards() == [0, 1] and store.commit_info(1)["n_samples"] == 4

    cfg_re = tiny_config(
        tmp_path,
        **{
            "data.samples_per_shard": 32,
            "cluster.processes": False,
            "data.on_source_change": "reencode",
        },
    )
    again = cache(cfg_re, client=inproc_client, shards=[a, b])
    assert [r.shard_id for r in again.done] == [1] and again.skipped == [0]
    assert FeatureStore.open(cfg.store_path).commit_info(1)["n_samples"] == 5
    gone = cache(cfg_re, client=inproc_client, shards=[a])
    assert not gone.done and FeatureStore.open(cfg.store_path).committed_shards() == [0]


def test_no_shards_says_run_download(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, **{"cluster.processes": False})
    with pytest.raises(FileNotFoundError, match="gap3d download"):
        cache(cfg, shards=[])
    assert cli_main(["cache", "--config", "tiny", f"workdir={tmp_path}"]) == 1


def test_tiny_demo_end_to_end(tiny_data, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Loopback server -> img2dataset -> shards (fixture) -> LocalCluster worker processes ->
    store; models load once per worker process; ``gap3d inspect`` shows the store complete."""
    from gap3d.pipeline.cluster import open_client
    from gap3d.pipeline.tars import read_tar
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
    # keys carry the partition: img2dataset numbers them per partition, the store needs them
    # unique (the train/val split is a function of the key)
    assert rows["key"] == [f"part-00000/{s['__key__']}" for s in first.samples]
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
    assert out["stats"]["partial_moments_shards"] == len(tiny_data.shards)


def _raw(c) -> dict:  # noqa: ANN001 - a BadCase
    return {"__key__": c.key, **c.entries}


@pytest.mark.parametrize("where", ["preprocess", "forward"])
def test_encoder_error_marks_only_that_sample(
    bad_run, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A sample the image encoder's preprocessing or forward raises on becomes
    ``encode_failed``; the rest are encoded by the real (tiny) encoders."""
    from gap3d.pipeline.workers import EncodeLimits, encode_samples

    cfg, cases, _, _ = bad_run
    good = [c for c in cases if not c.reason][:4]
    decoded = [decode_sample(_raw(c), MAX_PIXELS, MAX_CAPTION) for c in good]
    enc = get_encoders(cfg.prompt_encoder, cfg.image_encoder)
    poison_px = enc.image.preprocess([decoded[1].image])
    if where == "preprocess":
        real = enc.image.preprocess

        def flaky(images):
            out = real(images)
            if any(torch.equal(p, poison_px[0]) for p in out):
                raise RuntimeError("encoder cannot handle this image")
            return out

        monkeypatch.setattr(enc.image, "preprocess", flaky)
    else:
        real = enc.image.encode_pixels

        def flaky(pixels):
            if any(torch.equal(p, poison_px[0]) for p in pixels):
                raise RuntimeError("encoder cannot handle this image")
            return real(pixels)

        monkeypatch.setattr(enc.image, "encode_pixels", flaky)
    limits = EncodeLimits(MAX_PIXELS, MAX_CAPTION)
    batches = list(encode_samples(enc, [_raw(c) for c in good], limits))
    data = batches[0]
    assert data.reason == ["", "encode_failed", "", ""]
    assert "cannot handle" in data.meta[1]["encode_error"]
    assert not data.image_tokens[1].any() and data.image_tokens[[0, 2, 3]].any()
    want = enc.image.encode([decoded[0].image]).numpy()[0]
    np.testing.assert_allclose(data.image_tokens[0], want, atol=1e-5)


def test_encode_task_streams_in_batches(bad_run) -> None:
    """The encode task decodes, encodes and hands over rows batch by batch (image encoder
    batch size), with the decoding of the next batch running ahead in another thread."""
    from gap3d.pipeline.batches import prefetch
    from gap3d.pipeline.workers import EncodeLimits, encode_samples

    cfg, cases, _, _ = bad_run
    enc = get_encoders(cfg.prompt_encoder, cfg.image_encoder)
    raw = [_raw(c) for c in cases]
    limits = EncodeLimits(MAX_PIXELS, MAX_CAPTION)
    batches = list(encode_samples(enc, iter(raw), limits, prefetch_depth=2))
    bs = cfg.image_encoder.batch_size
    assert [len(b) for b in batches] == [min(bs, len(raw) - i) for i in range(0, len(raw), bs)]
    assert [k for b in batches for k in b.key] == [c.key for c in cases]
    # the prefetch passes items through in order and re-raises a producer error in place
    assert list(prefetch(iter(range(7)), depth=2)) == list(range(7))

    def boom():
        yield 1
        raise ValueError("producer failed")

    got = []
    with pytest.raises(ValueError, match="producer failed"):
        for x in prefetch(boom(), depth=1):
            got.append(x)
    assert got == [1]


def test_gpu_resources_without_gpu_workers_is_a_clear_error(bad_run, tmp_path: Path) -> None:
    cfg, cases, _, client = bad_run
    gpu_cfg = tiny_config(tmp_path, **{"cluster.gpu_resources": True})
    with pytest.raises(RuntimeError, match="--resources GPU=1"):
        cache(gpu_cfg, client=client, shards=[write_shard_tar(tmp_path / "a.tar", cases[:2])])


def _image_bytes(fmt: str, colour: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, fmt)
    return buf.getvalue()


def test_existing_webdataset_shards_as_input(tmp_path: Path, inproc_client) -> None:
    """data.source=shards: a brace pattern over local tars and an http(s) URL, read by
    streaming; the img2dataset layout and common variants (png, webp, caption in json)."""
    import io
    import tarfile

    from gap3d.pipeline.server import serve_directory

    def tar(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tf:
            for key, entries in samples.items():
                for ext, data in entries.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        return path

    js = lambda **kw: json.dumps(kw).encode()  # noqa: E731
    tar(tmp_path / "in" / "00000.tar", {
        "000000000": {"jpg": _image_bytes("JPEG", "red"), "txt": b"a red square",
                      "json": js(url="http://x/0.jpg", status="success")},
        "000000001": {"png": _image_bytes("PNG", "blue"), "txt": b"a blue square"},
    })  # fmt: skip
    tar(tmp_path / "in" / "00001.tar", {
        "000000002": {"webp": _image_bytes("WEBP", "green"), "json": js(caption="a green one")},
    })  # fmt: skip
    tar(tmp_path / "web" / "remote.tar", {
        "000000003": {"jpeg": _image_bytes("JPEG", "white"), "json": js(caption="a white one")},
    })  # fmt: skip
    with serve_directory(tmp_path / "web") as base:
        cfg = tiny_config(
            tmp_path,
            **{
                "data.source": "shards",
                "data.shards": [str(tmp_path / "in" / "{00000..00001}.tar"), f"{base}/remote.tar"],
                "cluster.processes": False,
            },
        )
        report = cache(cfg, client=inproc_client)
        assert report.ok and report.n_samples == report.n_valid == 4, report.summary()
        store = FeatureStore.open(cfg.store_path)
        rows = store.indices()
        got = store.read(rows, fields=["caption", "key", "url"])
        assert got["caption"] == ["a red square", "a blue square", "a green one", "a white one"]
        assert got["url"][0] == "http://x/0.jpg"
        assert store.commit_info(2)["source"]["url"] == f"{base}/remote.tar"
        assert store.commit_info(2)["source"]["fingerprint"]["size"] > 0
        again = cache(cfg, client=inproc_client)
        assert again.skipped == [0, 1, 2] and not again.done
