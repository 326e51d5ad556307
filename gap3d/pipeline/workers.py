"""What runs inside a Dask worker during ``gap3d cache``: model cache and the per-shard task.

Models are loaded once per worker *process*: :func:`get_encoders` keeps them in a module-level
cache keyed by the encoder configs, so the second shard a worker gets costs no loading at all
(paper scale: ~7 GB of VLM weights). :func:`encode_shard` is the one Dask task per shard: read
the tar, decode robustly, encode in batches, write the shard's store region, report.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gap3d.config import ImageEncoderConfig, PromptEncoderConfig
from gap3d.encoders import ImageEncoder, PromptEncoder, build_image_encoder, build_prompt_encoder
from gap3d.pipeline.decode import DecodedSample, decode_any, read_tar, thumbnail
from gap3d.pipeline.prompt_inputs import PromptPolicy, assign_prompt_images, encode_prompts
from gap3d.store import FeatureStore, ShardData
from gap3d.store.manifest import THUMBNAIL_SIZE


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
    encode_seconds: float = 0.0  # time inside the encoders (preprocessing + forward)
    worker_pid: int = 0


def _encode_valid(enc: Encoders, samples: list[DecodedSample]) -> tuple[np.ndarray, ...]:
    """Prompt latents, masks and image tokens for ``samples`` (all valid).

    The encoders batch by their own ``batch_size``. If a call raises, the samples are retried
    one by one, so one sample the encoder cannot handle is marked ``encode_failed`` instead of
    failing the whole shard.
    """
    n, lay = len(samples), enc.image.layout
    lat = np.zeros((n, enc.prompt.max_length, enc.prompt.hidden_size), np.float32)
    mask = np.zeros((n, enc.prompt.max_length), bool)
    tok = np.zeros((n, lay.n_tokens, lay.channels), np.float32)

    def run(lo: int, hi: int) -> None:
        batch = samples[lo:hi]
        pb = encode_prompts(enc.prompt, batch)  # text, or text + s.prompt_image
        lat[lo:hi], mask[lo:hi] = pb.hidden.numpy(), pb.mask.numpy()
        tok[lo:hi] = enc.image.encode([s.image for s in batch]).numpy()

    with enc.lock:
        try:
            run(0, n)
        except Exception:  # noqa: BLE001 - isolate the bad sample below
            for i in range(n):
                try:
                    run(i, i + 1)
                except Exception as e:  # noqa: BLE001 - recorded on the sample
                    samples[i].meta["encode_error"] = f"{type(e).__name__}: {e}"[:200]
                    samples[i].invalid("encode_failed")
    return lat, mask, tok


def encode_samples(
    enc: Encoders, decoded: list[DecodedSample], timings: dict[str, float] | None = None
) -> ShardData:
    """Decoded samples (valid or not, in shard order) -> the store's :class:`ShardData`.

    ``timings["forward_s"]`` (if given) receives the seconds spent in the encoders.
    """
    n, lay = len(decoded), enc.image.layout
    L, D = enc.prompt.max_length, enc.prompt.hidden_size
    lat = np.zeros((n, L, D), np.float32)
    mask = np.zeros((n, L), bool)
    tok = np.zeros((n, lay.n_tokens, lay.channels), np.float32)
    rows = [i for i, d in enumerate(decoded) if d.valid]
    t0 = time.perf_counter()
    if rows:
        v_lat, v_mask, v_tok = _encode_valid(enc, [decoded[i] for i in rows])
        lat[rows], mask[rows], tok[rows] = v_lat, v_mask, v_tok
    if timings is not None:
        timings["forward_s"] = time.perf_counter() - t0
    thumbs = (
        np.stack([thumbnail(d.image, THUMBNAIL_SIZE) for d in decoded])
        if n
        else np.zeros((0, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3), np.uint8)
    )
    return ShardData(
        image_tokens=tok,
        prompt_latents=lat,
        prompt_mask=mask,
        caption=[d.caption for d in decoded],
        key=[d.key for d in decoded],
        url=[d.url for d in decoded],
        split=[d.split for d in decoded],
        meta=[d.meta for d in decoded],
        reason=[d.reason for d in decoded],
        thumbnail=thumbs,
    )


def encode_shard(
    shard_id: int,
    tar_path: str,
    store_path: str,
    pcfg: PromptEncoderConfig,
    icfg: ImageEncoderConfig,
    max_image_pixels: int,
    max_caption_chars: int,
    torch_threads: int | None = None,
) -> ShardReport:
    """The Dask task for one shard: tar -> decode -> encode -> ``store.write_shard``."""
    t0 = time.perf_counter()
    tune_malloc()
    set_torch_threads(torch_threads)
    tar = read_tar(tar_path)
    if tar.error and not tar.samples:
        raise RuntimeError(
            f"shard {shard_id}: cannot read {tar_path} ({tar.error}); "
            "re-download it (`gap3d download`) and re-run"
        )
    store = FeatureStore.open(store_path, mode="r+")
    if len(tar.samples) > store.samples_per_shard:
        raise RuntimeError(
            f"shard {shard_id}: {tar_path} holds {len(tar.samples)} samples, more than the "
            f"store's samples_per_shard={store.samples_per_shard}; the shards were downloaded "
            "with another data.samples_per_shard; use that value or re-download"
        )
    decoded = [decode_any(s, max_image_pixels, max_caption_chars) for s in tar.samples]
    assign_prompt_images(decoded, PromptPolicy.from_manifest(store.manifest))
    enc = get_encoders(pcfg, icfg)
    timings: dict[str, float] = {}
    data = encode_samples(enc, decoded, timings)
    info = store.write_shard(shard_id, data)
    return ShardReport(
        shard_id=shard_id,
        path=str(Path(tar_path)),
        n_samples=info["n_samples"],
        n_valid=info["n_valid"],
        invalid=dict(info["reasons"]),
        tar_error=tar.error,
        seconds=time.perf_counter() - t0,
        encode_seconds=timings["forward_s"],
        worker_pid=os.getpid(),
    )
