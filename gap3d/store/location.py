"""Where a feature store lives: a URL resolved to zarr's storage layer and to tensorstore.

A store is addressed by a URL: a local path (``work/demo/features.zarr``), ``file://…``,
``s3://bucket/prefix/features.zarr``, ``gs://bucket/…``, or ``memory://name`` (one process
only; for tests). Everything the store does goes through :meth:`StoreLocation.open_zarr_store`
(zarr's ``LocalStore`` for local paths, ``FsspecStore`` for the rest: s3fs, gcsfs, fsspec's
memory filesystem) so creation, the manifest, commit records and statistics work the same on a
laptop and on object storage. Training reads go through tensorstore (see ``reader.py``), which
gets its key-value store spec from :meth:`StoreLocation.tensorstore_kvstore`.

Credentials never live here: s3fs/botocore, gcsfs and tensorstore find them the usual way
(``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``/instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``…).
A URL that embeds credentials (``s3://KEY:SECRET@bucket``) is refused, so they can never reach
a manifest, a log line or ``gap3d config`` output. For S3-compatible servers (MinIO, Ceph,
a loopback test server) set ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), which botocore
reads itself and which is passed on to tensorstore.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gap3d.store.manifest import StoreError

# Schemes that go through fsspec; anything else with "://" is refused up front.
REMOTE_SCHEMES = ("s3", "gs", "gcs", "memory")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def redact_url(url: str) -> str:
    """``url`` without user info and query string (both may carry secrets), for logs/records."""
    if not _SCHEME.match(url):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def is_url(text: str) -> bool:
    """True for ``scheme://…`` (including ``file://``), False for plain paths."""
    return bool(_SCHEME.match(text))


def s3_endpoint() -> str | None:
    """The S3 endpoint of an S3-compatible server, as botocore reads it from the environment."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store URL. ``scheme`` is ``file`` for local paths."""

    url: str  # as the user wrote it (local paths made absolute)
    scheme: str
    path: str  # local: absolute path; remote: "bucket/prefix/x.zarr" (no scheme)

    @classmethod
    def parse(cls, url: str | os.PathLike[str]) -> StoreLocation:
        text = os.fspath(url)
        if not text:
            raise StoreError("empty store location; set store.path")
        m = _SCHEME.match(text)
        if not m:
            local = str(Path(text).expanduser().resolve())
            return cls(url=local, scheme="file", path=local)
        scheme = m.group(1).lower()
        parts = urlsplit(text)
        if parts.username or parts.password:
            raise StoreError(
                f"{redact_url(text)}: credentials in a store URL are refused (they would end up "
                "in logs and manifests); provide them through the environment or a profile "
                "(AWS_ACCESS_KEY_ID/AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)"
            )
        if parts.query or parts.fragment:
            raise StoreError(f"{redact_url(text)}: a store URL takes no query string or fragment")
        if scheme == "file":
            local = str(Path(parts.path).expanduser().resolve())
            return cls(url=local, scheme="file", path=local)
        if scheme not in REMOTE_SCHEMES:
            raise StoreError(
                f"{text}: unsupported store scheme '{scheme}://'; use a local path, file://, "
                "s3://, gs:// or memory://"
            )
        if scheme == "gcs":
            scheme = "gs"
        path = (parts.netloc + parts.path).rstrip("/")
        if scheme != "memory" and (not parts.netloc or parts.path.strip("/") == ""):
            raise StoreError(
                f"{text}: give a bucket and a prefix, e.g. {scheme}://bucket/prefix/features.zarr"
            )
        return cls(url=f"{scheme}://{path}", scheme=scheme, path=path)

    # ------------------------------------------------------------------ properties
    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def is_memory(self) -> bool:
        return self.scheme == "memory"

    @property
    def name(self) -> str:
        """Last path component, e.g. ``features.zarr``."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def child(self, name: str) -> str:
        """URL of a key or folder below the store root (for messages)."""
        return f"{self.url.rstrip('/')}/{name}"

    # ------------------------------------------------------------------ zarr
    def open_zarr_store(self, read_only: bool = False) -> Any:
        """A fresh zarr store: ``LocalStore`` for local paths, ``FsspecStore`` otherwise.

        Each process opens its own (fsspec's async clients and zarr's event loop must not
        cross a fork), which is why :class:`~gap3d.store.feature_store.FeatureStore` calls this
        per process instead of pickling a store object.
        """
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.path, read_only=read_only)
        # No listings cache: commit records appear while a store is being written, and a
        # cached listing of commits/ would hide them (s3fs and gcsfs cache listings by default).
        options = {} if self.is_memory else {"use_listings_cache": False}
        try:
            return FsspecStore.from_url(self.url, storage_options=options, read_only=read_only)
        except ImportError as e:
            pkg = {"s3": "s3fs", "gs": "gcsfs"}.get(self.scheme, "fsspec")
            raise StoreError(f"{self.url}: needs the package {pkg} (pip install {pkg})") from e

    def exists(self) -> bool:
        """Whether anything is stored at the location (a local folder, or any key below it)."""
        if self.is_local:
            return Path(self.path).exists()
        from zarr.core.sync import sync

        store = self.open_zarr_store(read_only=True)

        async def any_key() -> bool:
            async for _ in store.list_prefix(""):
                return True
            return False

        try:
            return bool(sync(any_key()))
        except FileNotFoundError:
            return False

    # ------------------------------------------------------------------ tensorstore
    def tensorstore_kvstore(self, array: str) -> dict[str, Any]:
        """tensorstore key-value store spec of array ``array`` of the store (a folder prefix).

        ``memory://`` has no tensorstore equivalent (zarr's memory filesystem lives in this
        Python process): callers read such stores through zarr.
        """
        if self.is_local:
            return {"driver": "file", "path": f"{self.path}/{array}/"}
        bucket, _, prefix = self.path.partition("/")
        key = f"{prefix}/{array}/" if prefix else f"{array}/"
        if self.scheme == "s3":
            spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key}
            endpoint = s3_endpoint()
            if endpoint:
                spec["endpoint"] = endpoint
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                spec["aws_region"] = region
            return spec
        if self.scheme == "gs":
            return {"driver": "gcs", "bucket": bucket, "path": key}
        raise StoreError(f"{self.url}: tensorstore cannot read '{self.scheme}://' stores")
