"""Streaming webdataset tars from a local path or any fsspec URL (s3://, gs://, https://).

:class:`TarStream` yields one sample dict at a time (``__key__`` + raw bytes per extension), so
an encode task holds one batch of samples, never a whole shard. Members larger than a limit are
skipped without being read (the sample is marked ``__oversize__``), and damage keeps every
sample before it: the sample the damage cuts through comes back as ``__truncated__``.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# Read buffer for remote tars: large enough for few requests, small enough to stream.
REMOTE_BLOCK_BYTES = 8 * 2**20


class TarDamage(tarfile.ReadError):
    """The tar is damaged; ``key`` is the sample whose member could not be read (if known)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def split_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


@contextlib.contextmanager
def open_binary(url: str | Path) -> Iterator[IO[bytes]]:
    """A local file or an fsspec URL opened for (mostly sequential) binary reading."""
    text = str(url)
    if "://" not in text or text.startswith("file://"):
        with open(text.removeprefix("file://"), "rb") as fh:
            yield fh
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(text)
    kwargs: dict[str, Any] = {"block_size": REMOTE_BLOCK_BYTES}
    if not text.startswith(("http://", "https://")):
        kwargs["cache_type"] = "readahead"
    with fs.open(path, "rb", **kwargs) as fh:
        yield fh


def iter_members(
    fh: IO[bytes], max_member_bytes: int | None = None
) -> Iterator[tuple[str, str, bytes | int]]:
    """``(key, ext, data)`` per regular file, streaming; ``data`` is the member's size (an int)
    instead of its bytes when it exceeds ``max_member_bytes`` (it is skipped unread).

    Raises :class:`TarDamage` at the first damage, after yielding everything before it.
    Python's tarfile treats a file cut inside a header as a normal end, so the end-of-archive
    marker (two zero blocks, written by every tar writer) is checked explicitly.
    """
    with tarfile.open(fileobj=fh, mode="r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, ext = split_name(m.name)
            if max_member_bytes is not None and m.size > max_member_bytes:
                yield key, ext, int(m.size)  # tarfile skips the data block by block
                continue
            try:
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
            except (tarfile.TarError, EOFError, OSError) as e:
                raise TarDamage(f"member {m.name}: {e}", key) from e
            if len(data) != m.size:
                raise TarDamage(f"member {m.name} ends after {len(data)}/{m.size} bytes", key)
            yield key, ext, data
        end = tf.offset
    try:
        fh.seek(end)
    except (OSError, io.UnsupportedOperation):
        return  # a pure stream: tarfile's own end check has to do
    marker = fh.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise TarDamage(f"no end-of-archive marker at byte {end}: the tar is truncated")


class TarStream:
    """The samples of one webdataset tar, in tar order, one at a time.

    Iterate once; afterwards ``error`` says what went wrong (``None``: nothing) and
    ``truncated_key`` names the sample the damage cut through, if any.
    """

    def __init__(self, url: str | Path, max_member_bytes: int | None = None) -> None:
        self.url = str(url)
        self.max_member_bytes = max_member_bytes
        self.error: str | None = None
        self.truncated_key: str | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        current: dict[str, Any] | None = None
        try:
            with open_binary(self.url) as fh:
                for key, ext, data in iter_members(fh, self.max_member_bytes):
                    if current is None or current["__key__"] != key:
                        if current is not None:
                            yield current
                        current = {"__key__": key, "__url__": self.url}
                    if isinstance(data, int):
                        current.setdefault("__oversize__", {})[ext] = data
                    else:
                        current[ext] = data
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            self.error = f"{type(e).__name__}: {e}"
            damaged = getattr(e, "key", None)
            if current is not None and damaged is not None and damaged != current["__key__"]:
                yield current  # a member of a new key started: current is whole
                current = None
            key = damaged if damaged is not None else (current or {}).get("__key__")
            if key is not None:
                self.truncated_key = key
                yield {"__key__": key, "__url__": self.url, "__truncated__": True}
            return
        if current is not None:
            yield current


class TarContents:
    """All samples of a tar in memory (small tars, tests): ``samples``, ``error``."""

    def __init__(self, url: str | Path, max_member_bytes: int | None = None) -> None:
        stream = TarStream(url, max_member_bytes)
        self.samples = list(stream)
        self.error = stream.error
        self.truncated_key = stream.truncated_key


def read_tar(url: str | Path, max_member_bytes: int | None = None) -> TarContents:
    """Every sample of a (small) tar; see :class:`TarStream`."""
    return TarContents(url, max_member_bytes)
