"""Crawling etiquette (issue 10, item 5): img2dataset's X-Robots-Tag opt-out check stays on,
and only http(s) URLs are taken from a URL list."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gap3d.config import ConfigError, Gap3dConfig, load_config
from gap3d.pipeline import download as dl
from gap3d.pipeline.server import free_port
from gap3d.pipeline.url_policy import REASON_MISSING, REASON_SCHEME, keep_web_urls

# what the test server sends with each file (None: no header)
ROBOTS = {
    "plain.png": None,
    "noai.png": "noai",
    "noimageai.png": "noimageai, noarchive",
    "otherbot.png": "otherbot: noai",  # addressed to another crawler: not for img2dataset
}


class _RobotsHandler(SimpleHTTPRequestHandler):
    def end_headers(self) -> None:
        tag = ROBOTS.get(self.path.rsplit("/", 1)[-1])
        if tag:
            self.send_header("X-Robots-Tag", tag)
        super().end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def robots_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("www")
    for i, name in enumerate(ROBOTS):
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(root / name)
    server = ThreadingHTTPServer(
        ("127.0.0.1", free_port()), functools.partial(_RobotsHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _cfg(tmp: Path, urls: list[str | None], *extra: str) -> Gap3dConfig:
    tmp.mkdir(parents=True, exist_ok=True)
    url_list = tmp / "pairs.parquet"
    pq.write_table(
        pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), url_list
    )
    return load_config(
        "tiny",
        [
            f"workdir={tmp / 'work'}",
            "data.source=urls",
            f"data.url_list={url_list}",
            "data.partition_rows=10000",
            "cluster.processes=false",
            "cluster.dashboard_address=",
            *extra,
        ],
    )


def test_x_robots_tag_opt_outs_are_honoured(robots_server: str, tmp_path: Path) -> None:
    local_file = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(local_file)
    urls = [f"{robots_server}/{name}" for name in ROBOTS] + [f"file://{local_file}"]
    cfg = _cfg(tmp_path, urls)
    assert dl._img2dataset_options(cfg, [])["disallowed_header_directives"] is None
    report = dl.download(cfg)
    reasons = report.failures_by_reason
    assert report.rows == 5 and report.successes == 2, reasons  # plain + otherbot
    assert sum(n for r, n in reasons.items() if "X-Robots-Tag" in r) == 2
    assert reasons[REASON_SCHEME] == 1  # the file:// row never reached img2dataset
    saved = json.loads((cfg.shards_dir / dl.REPORT_FILE).read_text())
    assert saved["failures_by_reason"] == reasons
    rejected = json.loads((cfg.shards_dir / "_inputs" / "rejected_urls.json").read_text())
    assert rejected["examples"] == [{"row": 4, "url": f"file://{local_file}"}]


def test_the_opt_out_check_can_be_changed_by_config(tmp_path: Path) -> None:
    # (img2dataset applying the list it is given is shown by the download above)
    urls = ["http://127.0.0.1:1/a.png"]
    only_noai = _cfg(tmp_path / "a", urls, "data.disallowed_header_directives=[NoAI]")
    assert dl._img2dataset_options(only_noai, [])["disallowed_header_directives"] == ["noai"]
    # [] turns the check off entirely (img2dataset's None)
    off = _cfg(tmp_path / "b", urls, "data.disallowed_header_directives=[]")
    assert dl._img2dataset_options(off, [])["disallowed_header_directives"] == []


def test_only_http_urls_are_kept() -> None:
    urls = [
        "https://example.com/a.jpg",
        "HTTP://EXAMPLE.COM/B.PNG",
        "  http://example.com/c.png  ",
        "file:///etc/passwd",
        "ftp://example.com/d.jpg",
        "s3://bucket/e.jpg",
        "data:image/png;base64,AAAA",
        "example.com/f.jpg",
        "http:///no-host.png",
        "javascript:alert(1)",
        None,
    ]
    table = pa.table({"url": urls, "caption": ["c"] * len(urls)})
    kept, summary = keep_web_urls(table, "url")
    assert kept["url"].to_pylist() == urls[:3]
    assert summary["rejected"] == 8
    assert summary["by_reason"] == {REASON_SCHEME: 7, REASON_MISSING: 1}
    assert summary["examples"][0] == {"row": 3, "url": "file:///etc/passwd"}


def test_a_list_without_web_urls_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, ["file:///a.png", "ftp://b/c.png"])
    with pytest.raises(ValueError, match="no http:// or https:// URLs"):
        dl.plan_partitions(cfg)


def test_empty_directive_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="disallowed_header_directives"):
        load_config("tiny", ["data.disallowed_header_directives=['']"])
