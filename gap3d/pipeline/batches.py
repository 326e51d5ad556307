"""Decoded, preprocessed batches of a shard, produced ahead of the encoders.

An encode task alternates CPU work (tar reading, image decoding, thumbnails, resizing and
normalising for the image encoder) with encoder forwards. :func:`prefetch` runs the CPU part
of the next batches in a background thread, with a bounded queue, so a GPU is not idle while
the CPU decodes and at most ``depth`` extra batches are held. Decoding, PIL and torch release
the GIL for their heavy parts, so the overlap is real on a CPU too.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from gap3d.pipeline.decode import DecodedSample, decode_any, thumbnail
from gap3d.store.manifest import THUMBNAIL_SIZE

T = TypeVar("T")
GROUP_CAP = 4  # a batch held open for a group grows to at most this many times its size


@dataclass
class DecodedBatch:
    """Consecutive samples of a shard; ``pixels`` holds the image encoder input of the valid
    ones, in order (``None`` when none is valid)."""

    samples: list[DecodedSample]
    thumbnails: np.ndarray  # (n, 64, 64, 3) uint8
    pixels: torch.Tensor | None

    @property
    def valid_rows(self) -> list[int]:
        return [i for i, s in enumerate(self.samples) if s.valid]


def _preprocess_valid(
    samples: list[DecodedSample], preprocess: Callable[[list[Image.Image]], torch.Tensor]
) -> torch.Tensor | None:
    """Preprocess the valid samples' images; one the preprocessing rejects becomes invalid
    (``encode_failed``, with the error in its meta) instead of failing the batch."""
    valid = [s for s in samples if s.valid]
    if not valid:
        return None
    try:
        return preprocess([s.image for s in valid])  # type: ignore[misc]
    except Exception:  # noqa: BLE001 - isolate the bad image below
        pass
    parts = []
    for s in valid:
        try:
            parts.append(preprocess([s.image]))  # type: ignore[list-item]
        except Exception as e:  # noqa: BLE001 - recorded on the sample
            s.meta["encode_error"] = f"{type(e).__name__}: {e}"[:200]
            s.invalid("encode_failed")
    return torch.cat(parts) if parts else None


def decoded_batches(
    samples: Iterable[dict[str, Any]],
    batch_size: int,
    max_image_pixels: int,
    max_caption_chars: int,
    preprocess: Callable[[list[Image.Image]], torch.Tensor],
    group_key: str | None = None,
    prepare: Callable[[list[DecodedSample]], None] | None = None,
) -> Iterator[DecodedBatch]:
    """Raw webdataset samples -> decoded batches of ``batch_size`` (the last may be short).

    ``group_key`` (a ``meta`` key, e.g. ``asset_id``): a batch that reached ``batch_size``
    grows until that key changes, so consecutive samples of a group share a batch (at most
    ``GROUP_CAP`` times the batch size, which bounds memory). ``prepare`` runs on each batch's
    decoded samples before preprocessing (e.g. choosing text+image prompts).
    """

    def make(decoded: list[DecodedSample]) -> DecodedBatch:
        if prepare is not None:
            prepare(decoded)
        thumbs = np.stack([thumbnail(d.image, THUMBNAIL_SIZE) for d in decoded])
        return DecodedBatch(decoded, thumbs, _preprocess_valid(decoded, preprocess))

    def group(d: DecodedSample) -> Any:
        return d.meta.get(group_key) if group_key else None

    buf: list[DecodedSample] = []
    for raw in samples:
        d = decode_any(raw, max_image_pixels, max_caption_chars)
        full = len(buf) >= batch_size
        if full and (
            group_key is None or group(d) != group(buf[-1]) or len(buf) >= GROUP_CAP * batch_size
        ):
            yield make(buf)
            buf = []
        buf.append(d)
    if buf:
        yield make(buf)


_END = object()


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead.

    Exceptions of the producer are raised in the consumer at the point they occurred; when
    the consumer stops early the producer is told to stop at its next item.
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", _END))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(("error", e))

    thread = threading.Thread(target=produce, name="gap3d-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)
