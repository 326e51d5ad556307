"""What runs inside a Dask worker during ``gap3d cache``: model cache and the per-shard task.

Models are loaded once per worker *process*: :func:`get_encoders` keeps them in a module-level
cache keyed by the encoder configs, so the second shard a worker gets costs no loading at all
(paper scale: ~7 GB of VLM weights). :func:`encode_shard` is the one Dask task per shard: stream
the tar, decode robustly and preprocess ahead of the encoders (a bounded prefetch), encode in
batches, write each block of rows as soon as it is full, commit last, report. A task's memory
is a few batches and one block of rows, whatever the shard size.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from gap3d.config import ImageEncoderConfig, PromptEncoderConfig
from gap3d.encoders import ImageEncoder, PromptEncoder, build_image_encoder, build_prompt_encoder
from gap3d.pipeline.batches import DecodedBatch, decoded_batches, prefetch
from gap3d.pipeline.prompt_inputs import PromptPolicy, assign_prompt_images, encode_prompts
from gap3d.pipeline.sources import SourceShard
from gap3d.pipeline.tars import TarStream
from gap3d.store import FeatureStore, ShardData


@dataclass
class Encoders:
    """A loaded pair of frozen encoders; ``lock`` serialises their use across worker threads
    (fast tokenizers are not re-entrant, and one process gains nothing from two forwards)."""

    prompt: PromptEncoder
    image: ImageEncoder
    lock: threading.Lock = field(default_factory=threading.Lock)


_CACHE: dict[str, Encoders] = {}
_CACHE_LOCK = threading.Lock()
_LOADS: Counter[str] = Counter()


def encoders_key(pcfg: PromptEncoderConfig, icfg: ImageEncoderConfig) -> str:
    """Cache key: the full encoder configs (device and dtype included)."""
    return json.dumps([dataclasses.asdict(pcfg), dataclasses.asdict(icfg)], sort_keys=True)


def get_encoders(pcfg: PromptEncoderConfig, icfg: ImageEncoderConfig) -> Encoders:
    """The encoders for these configs, loaded at most once in this process."""
    key = encoders_key(pcfg, icfg)
    with _CACHE_LOCK:  # two threads of one worker must not both load a 3B model
        if key not in _CACHE:
            enc = Encoders(build_prompt_encoder(pcfg), build_image_encoder(icfg))
            # One tiny forward each: lazy initialisation (kernel selection, allocator pools,
            # CUDA context) is paid here, once, instead of inside the first shard's timing.
            enc.prompt.encode(["warm-up"])
            enc.image.encode([Image.new("RGB", (icfg.image_size, icfg.image_size))])
            _CACHE[key] = enc
            _LOADS[key] += 1
        return _CACHE[key]


def load_count() -> int:
    """How many times this process loaded an encoder pair (tests check it stays at 1)."""
    return sum(_LOADS.values())


def set_torch_threads(n: int | None) -> None:
    """Intra-op threads for this worker. Dask's nanny starts workers with OMP_NUM_THREADS=1,
    which would leave a CPU encoder on one core; the client passes a fair share instead."""
    if n and n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_TUNED = False


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc reuse the big activation buffers of a forward pass (Linux; once per process).

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed memory goes
    back to the OS. Setting it also freezes glibc's dynamic mmap threshold at 128 KiB, so every
    activation tensor becomes a fresh ``mmap`` and page-faults in again: the EfficientNet
    forward ran ~25% slower in such a process here (benchmarks/cache.py). Raising both
    thresholds keeps at most ``trim_threshold`` bytes of freed heap per worker.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return _MALLOC_TUNED
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: nothing to tune
        return False
    _MALLOC_TUNED = bool(
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
    return _MALLOC_TUNED


def encoder_info(pcfg: PromptEncoderConfig, icfg: ImageEncoderConfig) -> dict[str, Any]:
    """``info()``/layout of both encoders, computed on a worker (it also warms its cache)."""
    tune_malloc()
    enc = get_encoders(pcfg, icfg)
    return {
        "prompt": enc.prompt.info(),
        "image": enc.image.info(),
        "layout": enc.image.layout.to_dict(),
        "prompt_dim": int(enc.prompt.hidden_size),
        "prompt_max_length": int(enc.prompt.max_length),
    }


@dataclass
class ShardReport:
    """What one encode task did; returned to the client (small, picklable)."""

    shard_id: int
    path: str
    n_samples: int = 0
    n_valid: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    tar_error: str | None = None  # the shard's tar was damaged; samples before it were kept
    seconds: float = 0.0
    encode_seconds: float = 0.0  # time inside the encoder forwards
    worker_pid: int = 0
    peak_rss_bytes: int = 0  # of the worker process, at the end of the task


@dataclass(frozen=True)
class EncodeLimits:
    """Per-sample guards of the encode task (from ``cfg.data``)."""

    max_image_pixels: int
    max_caption_chars: int
    max_member_bytes: int | None = None


def encode_batch(enc: Encoders, batch: DecodedBatch, timings: dict[str, float]) -> ShardData:
    """One decoded batch -> its :class:`ShardData` rows (prompt latents, masks, tokens).

    If an encoder call raises, the batch's samples are retried one by one, so one sample the
    encoder cannot handle is marked ``encode_failed`` instead of failing the whole shard.
    """
    samples = batch.samples
    n, lay = len(samples), enc.image.layout
    L, D = enc.prompt.max_length, enc.prompt.hidden_size
    lat = np.zeros((n, L, D), np.float32)
    mask = np.zeros((n, L), bool)
    tok = np.zeros((n, lay.n_tokens, lay.channels), np.float32)
    rows = batch.valid_rows
    t0 = time.perf_counter()
    if rows:
        pixels = batch.pixels
        assert pixels is not None and len(pixels) == len(rows)

        def run(sel: list[int]) -> None:
            idx = [rows[i] for i in sel]
            pb = encode_prompts(enc.prompt, [samples[i] for i in idx])  # text (+ prompt_image)
            lat[idx], mask[idx] = pb.hidden.numpy(), pb.mask.numpy()
            tok[idx] = enc.image.encode_pixels(pixels[sel]).numpy()

        with enc.lock:
            try:
                run(list(range(len(rows))))
            except Exception:  # noqa: BLE001 - isolate the bad sample below
                for j in range(len(rows)):
                    try:
                        run([j])
                    except Exception as e:  # noqa: BLE001 - recorded on the sample
                        s = samples[rows[j]]
                        s.meta["encode_error"] = f"{type(e).__name__}: {e}"[:200]
                        s.invalid("encode_failed")
    timings["forward_s"] = timings.get("forward_s", 0.0) + time.perf_counter() - t0
    return ShardData(
        image_tokens=tok,
        prompt_latents=lat,
        prompt_mask=mask,
        caption=[d.caption for d in samples],
        key=[d.key for d in samples],
        url=[d.url for d in samples],
        split=[d.split for d in samples],
        meta=[d.meta for d in samples],
        reason=[d.reason for d in samples],
        thumbnail=batch.thumbnails,
    )


def encode_samples(
    enc: Encoders,
    raw_samples: Iterable[dict[str, Any]],
    limits: EncodeLimits,
    timings: dict[str, float] | None = None,
    prefetch_depth: int = 1,
    policy: PromptPolicy | None = None,
) -> Iterator[ShardData]:
    """Raw webdataset samples (in shard order) -> :class:`ShardData` batches, streaming.

    Decoding and preprocessing of the next batch run in a background thread
    (``prefetch_depth`` batches ahead) while the encoders work on the current one.
    ``timings["forward_s"]`` (if given) receives the seconds spent in the encoders.
    ``policy``: the store's text+image prompt policy (``prompt_inputs``); its images are
    chosen within each batch, and batches are cut between groups (e.g. the views of one
    asset) so that another view of a sample's object is in its batch.
    """
    timings = {} if timings is None else timings
    policy = policy or PromptPolicy()
    other_view = policy.active and policy.source == "other_view"
    batches = decoded_batches(
        raw_samples,
        enc.image.cfg.batch_size,
        limits.max_image_pixels,
        limits.max_caption_chars,
        enc.image.preprocess,
        group_key=policy.group_key if other_view else None,
        prepare=(lambda samples: assign_prompt_images(samples, policy)) if policy.active else None,
    )
    for batch in prefetch(batches, prefetch_depth):
        yield encode_batch(enc, batch, timings)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def encode_shard(
    shard_id: int,
    source: SourceShard,
    store_url: str,
    pcfg: PromptEncoderConfig,
    icfg: ImageEncoderConfig,
    limits: EncodeLimits,
    torch_threads: int | None = None,
    prefetch_depth: int = 1,
) -> ShardReport:
    """The Dask task for one shard: stream the tar -> decode -> encode -> write, batch by
    batch; the commit record goes last (``gap3d.store.writer``)."""
    t0 = time.perf_counter()
    tune_malloc()
    set_torch_threads(torch_threads)
    store = FeatureStore.open(store_url, mode="r+", reader="zarr")
    enc = get_encoders(pcfg, icfg)
    stream = TarStream(source.url, limits.max_member_bytes)
    writer = store.shard_writer(shard_id, source=source.record()).begin()
    timings: dict[str, float] = {}
    n = 0
    policy = PromptPolicy.from_manifest(store.manifest)
    for data in encode_samples(enc, stream, limits, timings, prefetch_depth, policy):
        if source.key_prefix:  # keys unique across the store: the train/val split hashes them
            data.key = [source.key_prefix + k for k in data.key]
        n += len(data)
        if n > store.samples_per_shard:
            raise RuntimeError(
                f"shard {shard_id}: {source.record()['url']} holds more than the store's "
                f"samples_per_shard={store.samples_per_shard} samples; the shards were made "
                "with another data.samples_per_shard; use that value or a new store"
            )
        writer.add(data)
    if stream.error and n == 0:
        raise RuntimeError(
            f"shard {shard_id}: cannot read {source.record()['url']} ({stream.error}); "
            "re-download or replace it and re-run"
        )
    info = writer.commit()
    return ShardReport(
        shard_id=shard_id,
        path=source.record()["url"],
        n_samples=info["n_samples"],
        n_valid=info["n_valid"],
        invalid=dict(info["reasons"]),
        tar_error=stream.error,
        seconds=time.perf_counter() - t0,
        encode_seconds=timings.get("forward_s", 0.0),
        worker_pid=os.getpid(),
        peak_rss_bytes=peak_rss_bytes(),
    )
