"""The input shards of ``gap3d cache``, with stable store shard ids and fingerprints.

Two kinds of sources:

* shards that ``gap3d download`` wrote (``data.source`` demo or urls): partition ``p``'s tar
  ``j`` becomes store shard ``p * shards_per_partition + j``; partitions hold a fixed number of
  URL-list rows, so appending rows adds shards and never renumbers old ones;
* existing webdataset tars (``data.source: shards``): ``data.shards`` lists paths or URLs
  (``s3://``, ``gs://``, ``https://``), each possibly a brace pattern
  (``/data/shards/{00000..00999}.tar``); store shard ``i`` is the ``i``-th tar.

Every source carries a fingerprint (size plus ETag, generation or modification time, from the
storage's own metadata: no byte of the tar is read), which the encode task writes into the
shard's commit record. A committed shard whose source changed is refused or re-encoded, never
silently mixed.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gap3d.config import Gap3dConfig
from gap3d.store.location import redact_url

# Metadata keys (fsspec's info() of local, s3fs, gcsfs and http files) that change whenever
# an object's content is replaced, in order of preference.
_VERSION_KEYS = (
    "ETag",
    "etag",
    "generation",
    "md5Hash",
    "mtime",
    "LastModified",
    "Last-Modified",
    "created",
)


@dataclass(frozen=True)
class SourceShard:
    """One input tar: where it is, which store shard it fills, and its fingerprint."""

    shard_id: int
    url: str
    fingerprint: dict[str, Any] = field(default_factory=dict)
    # prepended to the tar's sample keys so that keys are unique in the store: img2dataset
    # numbers keys per invocation, and gap3d download runs one per partition
    key_prefix: str = ""

    def record(self) -> dict[str, Any]:
        """What goes into the commit record (credentials and query strings removed)."""
        return {"url": redact_url(self.url), "fingerprint": self.fingerprint}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expand_patterns(patterns: list[str]) -> list[str]:
    """Brace patterns expanded in order (``a/{000..002}.tar`` -> three paths)."""
    from braceexpand import braceexpand

    out: list[str] = []
    for p in patterns:
        out.extend(braceexpand(p))
    return out


def fingerprint(url: str) -> dict[str, Any]:
    """Size plus a version marker of a local file or remote object (no content read)."""
    text = str(url)
    if "://" not in text or text.startswith("file://"):
        st = os.stat(text.removeprefix("file://"))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    import fsspec

    fs, path = fsspec.core.url_to_fs(text)
    info = fs.info(path)
    out: dict[str, Any] = {"size": info.get("size")}
    for key in _VERSION_KEYS:
        if info.get(key) not in (None, ""):
            out[key.lower()] = str(info[key]).strip('"')
            break
    return out


def downloaded_sources(cfg: Gap3dConfig) -> list[SourceShard]:
    """Finished shards of ``gap3d download`` with their stable store shard ids."""
    from gap3d.pipeline.download import read_done_marker

    per_part = math.ceil(cfg.data.partition_rows / cfg.data.samples_per_shard)
    out = []
    for part in sorted(Path(cfg.shards_dir).glob("part-[0-9]*")):
        marker = read_done_marker(part)
        if marker is None:
            continue
        p = int(part.name.split("-")[1])
        for name in sorted(marker["shards"]):
            j = int(Path(name).stem)
            path = part / name
            out.append(
                SourceShard(p * per_part + j, str(path), fingerprint(str(path)), f"{part.name}/")
            )
    return sorted(out, key=lambda s: s.shard_id)


def listed_sources(patterns: list[str]) -> list[SourceShard]:
    """``data.shards``: store shard ``i`` is the ``i``-th tar after brace expansion."""
    urls = expand_patterns(patterns)
    out = []
    for i, url in enumerate(urls):
        try:
            fp = fingerprint(url)
        except FileNotFoundError:
            raise FileNotFoundError(f"input shard {i} not found: {redact_url(url)}") from None
        out.append(SourceShard(i, url, fp))
    return out


def list_sources(cfg: Gap3dConfig) -> list[SourceShard]:
    """The input shards of ``gap3d cache`` for this config, sorted by store shard id."""
    if cfg.data.source == "shards":
        return listed_sources(list(cfg.data.shards))
    return downloaded_sources(cfg)
