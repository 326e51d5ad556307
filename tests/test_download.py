"""Loopback server, Dask helpers and the img2dataset download stage (real downloads)."""

from __future__ import annotations

import io
import json
import operator
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gap3d.config import ClusterConfig, Gap3dConfig, load_config
from gap3d.pipeline import download as dl
from gap3d.pipeline.cluster import daemonic_workers, gather_with_progress, open_client
from gap3d.pipeline.server import free_port, serve_directory

# ------------------------------------------------------------------------------------ server


def test_server_serves_files_and_404s(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    with serve_directory(tmp_path, port=0) as base:
        assert base.startswith("http://127.0.0.1:")
        assert urllib.request.urlopen(f"{base}/a.txt", timeout=5).read() == b"hello"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/missing.txt", timeout=5)
        assert e.value.code == 404
    with pytest.raises(urllib.error.URLError):  # stopped with the with-block
        urllib.request.urlopen(f"{base}/a.txt", timeout=2)


@pytest.mark.parametrize("host", ["0.0.0.0", "8.8.8.8", "192.168.1.10", "::", "example.com"])
def test_server_refuses_non_loopback_hosts(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        with serve_directory(tmp_path, host=host):
            pass


def test_server_reports_a_busy_port(tmp_path: Path) -> None:
    with serve_directory(tmp_path) as base:
        port = int(base.rsplit(":", 1)[1])
        with pytest.raises(RuntimeError, match="data.demo.port"):
            with serve_directory(tmp_path, port=port):
                pass


# ------------------------------------------------------------------------------------- dask


def test_gather_collects_failures_without_raising() -> None:
    cfg = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="")
    with open_client(cfg, purpose="test") as client:
        futures = [client.submit(operator.truediv, 1, d, pure=False) for d in (1, 0, 4)]
        results, failures = gather_with_progress(futures, desc="test", sizes=[3, 3, 3])
    assert results == [1.0, None, 0.25]
    assert [f.index for f in failures] == [1]
    assert failures[0].error.startswith("ZeroDivisionError")
    assert "truediv" in failures[0].traceback or failures[0].traceback == ""


def _wait_for_scheduler(addr: str, timeout: float = 60.0) -> None:
    from distributed import Client

    deadline = time.time() + timeout
    while True:
        try:
            with Client(addr, timeout="5s") as c:
                c.wait_for_workers(1, timeout=max(1.0, deadline - time.time()))
                return
        except (OSError, TimeoutError):
            if time.time() > deadline:
                raise


def test_open_client_attaches_to_an_external_cluster_and_leaves_it_running() -> None:
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    bindir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [
                str(bindir / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        procs.append(
            subprocess.Popen(
                [
                    str(bindir / "dask"),
                    "worker",
                    addr,
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                ],
                env=env,
                stderr=subprocess.DEVNULL,
            )
        )
        _wait_for_scheduler(addr)
        with open_client(ClusterConfig(scheduler=addr), purpose="test") as client:
            assert daemonic_workers(client) == []  # the documented env var took effect
            assert client.submit(operator.add, 2, 3).result() == 5
        # open_client closed its client only: the cluster still answers.
        _wait_for_scheduler(addr, timeout=10)
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_open_client_names_an_unreachable_scheduler() -> None:
    cfg = ClusterConfig(scheduler=f"tcp://127.0.0.1:{free_port()}")
    with pytest.raises(RuntimeError, match="cannot reach the Dask scheduler"):
        with open_client(cfg, purpose="test", connect_timeout_s=1.0):
            pass


# --------------------------------------------------------------------------------- URL list


def test_url_list_column_errors_list_available_columns(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("link\ttext\nhttp://127.0.0.1:1/a.png\ta cat\n")
    with pytest.raises(
        ValueError, match=r"lacks column\(s\) \['url'\].*available: \['link', 'text'\]"
    ):
        dl.read_url_list(path, "url", "text", [])
    table = dl.read_url_list(path, "link", "text", [])
    assert table.column_names == ["link", "text"] and table.num_rows == 1
    with pytest.raises(ValueError, match="clash"):
        dl.read_url_list(path, "link", "text", ["status"])
    (tmp_path / "pairs.json").write_text("{}")
    with pytest.raises(ValueError, match="unsupported format"):
        dl.read_url_list(tmp_path / "pairs.json", "url", "caption", [])


# ------------------------------------------------------------------- real downloads (demo)


def _tiny(workdir: Path, *extra: str) -> Gap3dConfig:
    return load_config(
        "tiny",
        [
            f"workdir={workdir}",
            f"data.demo.port={free_port()}",
            "cluster.dashboard_address=",
            *extra,
        ],
    )


def _samples(tar: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()  # type: ignore[union-attr]
    return out


@pytest.fixture(scope="module")
def demo_download(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Gap3dConfig, dl.DownloadReport]:
    # One worker *process* (the default LocalCluster kind, non-daemonic so img2dataset can
    # start its processes), two partitions downloaded side by side.
    cfg = _tiny(
        tmp_path_factory.mktemp("dl"), "data.partition_rows=12", "cluster.threads_per_worker=2"
    )
    return cfg, dl.download(cfg)


def test_demo_download_writes_webdataset_shards(demo_download) -> None:  # noqa: ANN001
    cfg, report = demo_download
    urls = pq.read_table(cfg.url_list_path).to_pylist()
    assert report.complete and report.rows == len(urls) == report.successes
    assert report.failures_by_reason == {}
    shards = dl.list_shards(cfg.shards_dir)
    assert [s.parent.name for s in shards] == ["part-00000", "part-00001"]
    assert len(shards) == report.n_shards
    by_url = {u["url"]: u for u in urls}
    seen = set()
    for tar in shards:
        for key, files in _samples(tar).items():
            assert {"png", "txt", "json"} <= set(files)
            meta = json.loads(files["json"])
            row = by_url[meta["url"]]
            assert files["txt"].decode() == row["caption"] == meta["caption"]
            for col in ("asset_id", "shape", "colour", "split", "view"):
                assert meta[col] == row[col]
            # the render's own bytes: a PNG that keeps its alpha channel (not re-encoded)
            assert files["png"][:8] == b"\x89PNG\r\n\x1a\n"
            assert Image.open(io.BytesIO(files["png"])).mode == "RGBA"
            seen.add(dl.sample_id(tar, key))
    assert len(seen) == len(urls)  # ids are unique across partitions
    saved = json.loads((cfg.shards_dir / dl.REPORT_FILE).read_text())
    assert saved["successes"] == report.successes and saved["complete"]


def test_rerun_skips_finished_partitions(demo_download) -> None:  # noqa: ANN001
    cfg, first = demo_download
    mtimes = {p: p.stat().st_mtime_ns for p in dl.list_shards(cfg.shards_dir)}
    again = dl.download(cfg)
    assert all(p.skipped for p in again.partitions)
    assert again.successes == first.successes and again.n_shards == first.n_shards
    assert {p: p.stat().st_mtime_ns for p in dl.list_shards(cfg.shards_dir)} == mtimes


def test_partial_partition_is_cleaned_and_redone(demo_download) -> None:  # noqa: ANN001
    cfg, first = demo_download
    part1 = dl.partition_dir(cfg.shards_dir, 1)
    (part1 / dl.DONE_MARKER).unlink()  # as if the task died before its marker
    (part1 / "junk.tmp").write_text("left over")
    kept = dl.list_shards(cfg.shards_dir)
    assert all(p.parent.name == "part-00000" for p in kept)  # unfinished: not listed
    cfg.cluster.processes = False  # threads in this process: img2dataset off the main thread
    again = dl.download(cfg)
    assert [p.skipped for p in again.partitions] == [True, False]
    assert not (part1 / "junk.tmp").exists()
    assert again.successes == first.successes
    assert len(dl.list_shards(cfg.shards_dir)) == first.n_shards


def test_failed_urls_are_counted_by_reason(demo_download, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    demo_cfg, _ = demo_download
    with serve_directory(demo_cfg.assets_dir) as base:
        renders = sorted(os.listdir(demo_cfg.assets_dir / "renders"))[:3]
        good = [f"{base}/renders/{name}" for name in renders]
        urls = (
            good + [f"{base}/renders/missing-{i}.png" for i in range(2)] + [f"{base}/library.json"]
        )
        url_list = tmp_path / "pairs.parquet"
        pq.write_table(
            pa.table(
                {
                    "link": urls,
                    "text": [f"caption {i}" for i in range(len(urls))],
                    "tag": [str(i) for i in range(len(urls))],
                }
            ),
            url_list,
        )
        cfg = _tiny(
            tmp_path / "work",
            "data.source=urls",
            f"data.url_list={url_list}",
            "data.url_col=link",
            "data.caption_col=text",
            "data.extra_cols=[tag]",
            "data.partition_rows=1000",
            "cluster.processes=false",
            # re-encoding is what rejects the non-image (kept bytes fail later, at decode)
            "data.download_reencode=true",
            "data.encode_format=jpg",
        )
        assert dl.cli_main(cfg, None) == 0  # some URLs failing is not a failed stage
    report = json.loads((cfg.shards_dir / dl.REPORT_FILE).read_text())
    assert report["successes"] == 3 and report["failures"] == 3
    reasons = report["failures_by_reason"]
    assert sum(n for r, n in reasons.items() if "404" in r) == 2
    assert sum(n for r, n in reasons.items() if "404" not in r) == 1  # the JSON "image"
    out = capsys.readouterr().out
    assert "3/6 images" in out and "404" in out
    tags = {
        json.loads(f["json"])["tag"]
        for t in dl.list_shards(cfg.shards_dir)
        for f in _samples(t).values()
    }
    assert tags == {"0", "1", "2"}


def test_appended_rows_add_partitions_and_never_move_old_ones(tmp_path: Path) -> None:
    """Fixed-size partitions: appending rows to a URL list leaves every full partition (its
    rows, fingerprint and store shard ids) as it was and adds partitions at the end."""
    from gap3d.pipeline.sources import SourceShard

    def url_list(n: int) -> Path:
        path = tmp_path / "pairs.parquet"
        pq.write_table(
            pa.table(
                {
                    "url": [f"http://127.0.0.1:1/{i}.png" for i in range(n)],
                    "caption": [f"c {i}" for i in range(n)],
                }
            ),
            path,
        )
        return path

    def plan(n: int) -> list[dl.PartitionTask]:
        cfg = _tiny(
            tmp_path / "work",
            "data.source=urls",
            f"data.url_list={url_list(n)}",
            "data.partition_rows=10",
            "data.samples_per_shard=4",
        )
        return dl.plan_partitions(cfg)

    before, after = plan(25), plan(47)
    assert [t.rows for t in before] == [10, 10, 5]
    assert [t.rows for t in after] == [10, 10, 10, 10, 7]
    assert [t.fingerprint for t in after[:2]] == [t.fingerprint for t in before[:2]]
    assert after[2].fingerprint != before[2].fingerprint  # the partial one grew

    # store shard ids: tar j of partition p is shard p * ceil(10 / 4) + j, whether or not the
    # partitions before it are finished
    from gap3d.pipeline.sources import downloaded_sources

    cfg = _tiny(tmp_path / "ids", "data.partition_rows=10", "data.samples_per_shard=4")
    for p, tars in ((0, ["00000.tar", "00001.tar", "00002.tar"]), (1, ["00000.tar"])):
        part = dl.partition_dir(cfg.shards_dir, p)
        part.mkdir(parents=True)
        for t in tars:
            (part / t).write_bytes(b"x" * (p + 1))
        (part / dl.DONE_MARKER).write_text(json.dumps({"shards": tars}))
    got = downloaded_sources(cfg)
    assert [s.shard_id for s in got] == [0, 1, 2, 3]
    assert isinstance(got[3], SourceShard) and got[3].fingerprint["size"] == 2
    assert got[3].key_prefix == "part-00001/" and got[0].key_prefix == "part-00000/"
    (dl.partition_dir(cfg.shards_dir, 0) / dl.DONE_MARKER).unlink()
    assert [s.shard_id for s in downloaded_sources(cfg)] == [3]
