"""What the download stage may fetch, and how it honours publishers' opt-outs.

Two rules, kept apart from the partitioning code in :mod:`gap3d.pipeline.download`:

* **Only web URLs.** A URL list is data from elsewhere; a ``file://`` row would copy files of
  the downloading machine into shards, and ``ftp://``, ``s3://`` or ``data:`` rows are not
  web images. Rows whose URL is not ``http://`` or ``https://`` (with a host) are left out
  before partitioning and counted by reason in the download report.
* **X-Robots-Tag opt-outs.** img2dataset refuses an image whose HTTP response carries an
  ``X-Robots-Tag`` directive listed in ``disallowed_header_directives``; its default list is
  ``noai, noimageai, noindex, noimageindex``. gap3d keeps that default
  (``data.disallowed_header_directives: null``). Setting a list replaces it; ``[]`` turns the
  check off, which is only right for a source whose owner agreed (your own server). The demo's
  loopback server sends no such header, so it needs no exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REJECTED_FILE = "rejected_urls.json"
ALLOWED_SCHEMES = ("http", "https")
# scheme, "://", then at least one host character that is not a separator
_WEB_URL = r"(?i)^https?://[^/?#\s]+"
REASON_SCHEME = "url scheme not allowed (only http:// and https:// URLs are downloaded)"
REASON_MISSING = "url missing"


def img2dataset_header_directives(directives: list[str] | None) -> list[str] | None:
    """The ``disallowed_header_directives`` argument: None keeps img2dataset's default."""
    if directives is None:
        return None
    return [d.strip().lower() for d in directives]


def keep_web_urls(table: Any, url_col: str) -> tuple[Any, dict[str, Any]]:
    """Rows of ``table`` whose URL is http(s), and a summary of the rows left out.

    The summary holds ``rejected`` (count), ``by_reason`` and up to five ``examples``
    (row number and URL) so the report can say what was dropped.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    urls = pc.cast(table[url_col], pa.string())
    present = pc.fill_null(pc.invert(pc.is_null(urls)), False)
    web = pc.fill_null(pc.match_substring_regex(pc.utf8_trim_whitespace(urls), _WEB_URL), False)
    keep = pc.and_(present, web)
    n_missing = int(pc.sum(pc.invert(present)).as_py() or 0)
    n_scheme = table.num_rows - int(pc.sum(keep).as_py() or 0) - n_missing
    examples = []
    if n_missing or n_scheme:
        dropped = pc.indices_nonzero(pc.invert(keep)).to_pylist()[:5]
        examples = [{"row": i, "url": urls[i].as_py()} for i in dropped]
    by_reason = {r: n for r, n in ((REASON_SCHEME, n_scheme), (REASON_MISSING, n_missing)) if n}
    summary = {"rejected": n_missing + n_scheme, "by_reason": by_reason, "examples": examples}
    return table.filter(keep), summary


def write_rejected(inputs_dir: Path, summary: dict[str, Any]) -> None:
    (inputs_dir / REJECTED_FILE).write_text(json.dumps(summary, indent=1))


def read_rejected(inputs_dir: Path) -> dict[str, Any]:
    """The summary written by the latest :func:`write_rejected` (empty when none)."""
    try:
        return json.loads((inputs_dir / REJECTED_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"rejected": 0, "by_reason": {}, "examples": []}
