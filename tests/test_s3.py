"""The whole pipeline on object storage, against a real S3 protocol endpoint on loopback.

A moto server (moto's stand-alone server mode, a separate process bound to 127.0.0.1, the way
s3fs tests itself) serves the S3 HTTP API. Input shards are uploaded to it; ``gap3d cache``
reads them from ``s3://`` and writes the store to ``s3://``, is SIGKILLed mid-run and resumed;
``gap3d inspect`` reads the store there, ``gap3d train`` trains a few steps on it and
``make resume`` continues the run. Only the credentials' environment variables and
``AWS_ENDPOINT_URL`` tell the tools where the server is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _kill import run_and_kill_when

from gap3d.pipeline.server import free_port
from gap3d.store import FeatureStore

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "gap3d-e2e"


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 (its own process) and the environment that points at it."""
    port = free_port()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "gap3d-test-key",
        "AWS_SECRET_ACCESS_KEY": "gap3d-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket=BUCKET)
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.3)
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        server.wait(timeout=15)


def _s3_keys(prefix: str) -> list[str]:
    out, token = [], None
    client = boto3.client("s3")
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = client.list_objects_v2(**kw)
        out += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def _commits(store_prefix: str) -> list[str]:
    return [k for k in _s3_keys(f"{store_prefix}/commits/shard-") if k.endswith("/zarr.json")]


def _gap3d(*args: str, env: dict[str, str], log: Path, check: bool = True) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "gap3d.cli", *args],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )
    text = log.read_text()
    if check:
        assert proc.returncode == 0, text[-4000:]
    return text


def test_cache_train_resume_on_s3(tiny_data, s3_env: dict[str, str], tmp_path: Path) -> None:
    s3 = boto3.client("s3")
    for i, tar in enumerate(tiny_data.shards):
        s3.upload_file(str(tar), BUCKET, f"shards/{i:05d}.tar")
    n = len(tiny_data.shards)
    store_url = f"s3://{BUCKET}/stores/tiny/features.zarr"
    common = [
        "--config",
        "tiny",
        f"workdir={tmp_path / 'work'}",
        "data.source=shards",
        f"data.shards=s3://{BUCKET}/shards/{{00000..{n - 1:05d}}}.tar",
        f"data.samples_per_shard={tiny_data.overrides['data.samples_per_shard']}",
        f"store.path={store_url}",
        "cluster.processes=false",  # one process: one SIGKILL takes the whole run down
    ]

    # 1. cache, SIGKILLed once the first shard has committed
    rc = run_and_kill_when(
        [sys.executable, "-m", "gap3d.cli", "cache", *common],
        lambda: bool(_commits("stores/tiny/features.zarr")),
        tmp_path / "killed.log",
        300,
        env=s3_env,
    )
    assert rc == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    committed = FeatureStore.open(store_url).committed_shards()
    assert 1 <= len(committed) < n, "the kill came too late to test a resume"

    # 2. resume: only the missing shards are encoded; the store ends complete and exact
    out = _gap3d("cache", *common, env=s3_env, log=tmp_path / "resume.log")
    assert f"{len(committed)} skipped" in out and "0 failed" in out
    store = FeatureStore.open(store_url)
    assert store.committed_shards() == list(range(n))
    assert len(store.indices(valid_only=False)) == tiny_data.successes
    for s in range(n):
        src = store.commit_info(s)["source"]
        assert src["url"] == f"s3://{BUCKET}/shards/{s:05d}.tar" and src["fingerprint"]["etag"]
    # the same tokens as a clean local run of the same shards
    local = tmp_path / "local.zarr"
    _gap3d(
        "cache",
        *[a for a in common if not a.startswith(("store.path=", "data."))],
        f"data.samples_per_shard={tiny_data.overrides['data.samples_per_shard']}",
        "data.source=shards",
        f"data.shards={json.dumps([str(p) for p in tiny_data.shards])}",
        f"store.path={local}",
        env=s3_env,
        log=tmp_path / "local.log",
    )
    ref = FeatureStore.open(local)
    rows = ref.indices()
    a, b = store.read(rows), ref.read(rows)
    assert np.array_equal(a["image_tokens"], b["image_tokens"]) and a["key"] == b["key"]

    # 3. a re-run over the complete store reads metadata only and changes nothing
    again = _gap3d("cache", *common, env=s3_env, log=tmp_path / "again.log")
    assert f"{n} skipped" in again and "0 encoded" in again

    # 4. inspect the store where it lives
    text = _gap3d("inspect", store_url, "--config", "tiny", env=s3_env, log=tmp_path / "i.log")
    assert f"{n}/{n} committed" in text and "STALE" not in text
    assert "gap3d-test-secret" not in text and "gap3d-test-key" not in text

    # 5. train a few steps from the S3 store, then `make resume` continues the run
    base = [f"workdir={tmp_path / 'work'}", f"store.path={store_url}"]
    run = ["train.checkpoint_every_n_steps=2", "train.val_every_n_steps=2"]
    _gap3d(
        "train", "--config", "tiny", *base, *run, "train.max_steps=4",
        env=s3_env, log=tmp_path / "train.log",
    )  # fmt: skip
    ckpt = tmp_path / "work" / "train" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    # DataLoader workers (forked) read the S3 store through tensorstore
    args = " ".join([*base, *run, "train.max_steps=6", "train.num_workers=2"])
    make = subprocess.run(
        ["make", "-C", str(ROOT), "resume", "CONFIG=tiny", f"ARGS={args}", f"VENV={sys.prefix}"],
        env=s3_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert make.returncode == 0, (make.stdout + make.stderr)[-4000:]
    assert "resuming from" in make.stdout and "final validation at step 6" in make.stdout
    for secret in ("gap3d-test-secret", "gap3d-test-key"):
        assert secret not in make.stdout and secret not in json.dumps(store.manifest)


def test_missing_bucket_and_open_errors_are_clear(s3_env: dict[str, str]) -> None:
    from test_store import make_shard, make_spec

    from gap3d.store import StoreError

    with pytest.raises(StoreError, match="Create the bucket 'no-such-bucket'"):
        FeatureStore.create("s3://no-such-bucket/x/features.zarr", make_spec())
    with pytest.raises(StoreError, match="no such feature store"):
        FeatureStore.open(f"s3://{BUCKET}/nothing/here.zarr")
    # a small store round trip through zarr-python and tensorstore on the same server
    spec = make_spec("tiny", "int8", n_shards=2, samples_per_shard=6)
    store = FeatureStore.create(f"s3://{BUCKET}/small/features.zarr", spec)
    data = make_shard(spec, 5, seed=1)
    store.write_shard(1, data)
    a = FeatureStore.open(store.url, reader="zarr").read(np.arange(6, 11))
    b = FeatureStore.open(store.url, reader="tensorstore").read(np.arange(6, 11))
    assert np.array_equal(a["image_tokens"], b["image_tokens"]) and a["key"] == data.key
