"""Shared pipeline test material: a hand-made corpus of bad samples and the tiny demo data.

Registered as a plugin in ``tests/conftest.py`` so the session-scoped fixtures are built once
for all pipeline test files; the builders are plain functions that tests also import.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gap3d.config import Gap3dConfig, load_config

# Small limit so that an ordinary 300x300 image trips the bomb guard in tests.
MAX_PIXELS = 200_000
MAX_CAPTION = 120


def _encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return np.concatenate(
        [
            np.broadcast_to(x, (h, w, 1)),
            np.broadcast_to(y, (h, w, 1)),
            np.full((h, w, 1), 128, np.float32),
        ],
        -1,
    ).astype(np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` with almost no pixel data (a 'bomb')."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@dataclass
class BadCase:
    """One hand-made sample and what decoding must make of it."""

    key: str
    entries: dict[str, bytes]
    reason: str = ""  # expected reason code, "" = valid
    meta_keys: tuple[str, ...] = ()  # keys that must appear in the decoded meta
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)  # other expectations, checked by tests


def bad_cases() -> list[BadCase]:
    """Every case of the brief's robust-decoding list, each with its expected outcome."""
    rgb = Image.fromarray(_gradient(40, 30))
    jpg = _encode(rgb, "JPEG", quality=90)
    cap = b"a red cube on a table"

    def js(**kw: Any) -> bytes:
        return json.dumps({"url": "http://127.0.0.1/x", "status": "success", **kw}).encode()

    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 20:, 3] = 255  # left half fully transparent: the alpha must survive decoding
    pal = Image.fromarray(_gradient(40, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    i16 = Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16))
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # pure red in CMYK

    return [
        BadCase(
            "ok_jpg",
            {"jpg": jpg, "txt": cap, "json": js(asset_id="a1", split="train")},
            extra={"asset_id": "a1", "size": (40, 30)},
        ),
        BadCase(
            "ok_heldout_png",
            {
                "png": _encode(rgb, "PNG"),
                "txt": cap,
                "json": js(split="heldout", asset_id="a2", shape="cube"),
            },
            split="heldout",
            extra={"asset_id": "a2"},
        ),
        BadCase("ok_webp", {"webp": _encode(rgb, "WEBP"), "txt": cap, "json": js()}),
        BadCase(
            "gray_l",
            {"png": _encode(rgb.convert("L"), "PNG"), "txt": cap},
            meta_keys=("image_mode",),
        ),
        BadCase(
            "cmyk_jpg",
            {"jpg": _encode(cmyk, "JPEG", quality=95), "txt": cap},
            meta_keys=("image_mode",),
            extra={"red": True},
        ),
        BadCase(
            "gray16_png",
            {"png": _encode(i16, "PNG"), "txt": cap},
            meta_keys=("image_mode",),
            extra={"not_saturated": True},
        ),
        BadCase(
            "palette_alpha",
            {"png": _encode(pal, "PNG", transparency=0), "txt": cap},
            meta_keys=("image_mode",),
        ),
        BadCase(
            "rgba_png",
            {"png": _encode(Image.fromarray(rgba, "RGBA"), "PNG"), "txt": cap},
            meta_keys=("image_mode",),
            extra={"alpha_left": True},
        ),
        BadCase(
            "la_png",
            {"png": _encode(Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG"), "txt": cap},
            meta_keys=("image_mode",),
            extra={"alpha_left": True},
        ),
        BadCase(
            "exif_rotated",
            {"jpg": _encode(rgb, "JPEG", exif=exif), "txt": cap},
            meta_keys=("exif_orientation",),
            extra={"size": (30, 40)},
        ),
        BadCase("truncated_jpg", {"jpg": jpg[: len(jpg) // 2], "txt": cap}, reason="image_corrupt"),
        BadCase(
            "corrupt_png",
            {"png": _encode(rgb, "PNG")[:60] + b"\x00" * 200, "txt": cap},
            reason="image_corrupt",
        ),
        BadCase("zero_byte", {"jpg": b"", "txt": cap}, reason="image_empty"),
        BadCase(
            "html_page",
            {"jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "txt": cap},
            reason="image_unknown_format",
        ),
        BadCase(
            "too_large",
            {"png": _encode(Image.new("RGB", (500, 500)), "PNG"), "txt": cap},
            reason="image_too_large",
        ),
        BadCase(
            "bomb_header",
            {"png": png_header_only(30_000, 30_000), "txt": cap},
            reason="image_too_large",
        ),
        BadCase("caption_empty", {"jpg": jpg, "txt": b"  \n\t "}, reason="caption_empty"),
        BadCase(
            "caption_long",
            {"jpg": jpg, "txt": b"word " * 100},
            meta_keys=("caption_truncated_from",),
            extra={"caption_len": MAX_CAPTION},
        ),
        BadCase(
            "caption_latin1",
            {"jpg": jpg, "txt": "caf\u00e9 cube".encode("latin-1")},
            meta_keys=("caption_non_utf8",),
            extra={"caption": "caf\ufffd cube"},
        ),
        BadCase("caption_missing", {"jpg": jpg, "json": js()}, reason="caption_missing"),
        BadCase(
            "caption_from_json",
            {"jpg": jpg, "json": js(caption="a blue cone")},
            meta_keys=("caption_from_json",),
            extra={"caption": "a blue cone"},
        ),
        BadCase("image_missing", {"txt": cap, "json": js()}, reason="image_missing"),
        BadCase(
            "json_malformed",
            {"jpg": jpg, "txt": cap, "json": b"{not json"},
            meta_keys=("json_malformed",),
        ),
    ]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # identical bytes across runs
    tf.addfile(info, io.BytesIO(data))


def write_shard_tar(path: Path, cases: list[BadCase]) -> Path:
    """A webdataset tar (``key.ext`` members, samples contiguous) of the given cases."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for c in cases:
            for ext, data in c.entries.items():
                _add(tf, f"{c.key}.{ext}", data)
    return path


def write_truncated_tar(path: Path, cases: list[BadCase], keep_complete: int) -> Path:
    """A tar cut in the middle of sample ``keep_complete`` (the ones before it are whole)."""
    full = write_shard_tar(path.with_suffix(".full"), cases)
    raw = full.read_bytes()
    full.unlink()
    offset = 0
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        members = tf.getmembers()
    n_before = sum(len(c.entries) for c in cases[:keep_complete])
    cut_member = members[n_before]
    offset = cut_member.offset_data + max(1, cut_member.size // 2)
    path.write_bytes(raw[:offset])
    return path


@pytest.fixture(scope="session")
def inproc_client() -> Iterator[Any]:
    """A Dask client whose one worker is a thread of the test process (fast, shares the
    encoder cache); tests that need real worker processes start their own cluster."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@dataclass
class TinyData:
    """The tiny demo downloaded once: configs for it differ only in what a test overrides."""

    workdir: Path
    overrides: dict[str, Any]
    shards: list[Path]
    successes: int

    def config(self, **more: Any) -> Gap3dConfig:
        return tiny_config(self.workdir, **{**self.overrides, **more})

    def cli_overrides(self, **more: Any) -> list[str]:
        items = {"workdir": str(self.workdir), **self.overrides, **more}
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in items.items()]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    """Tiny demo library rendered, served on loopback and fetched by img2dataset, once.

    Four samples per shard, so that the tiny demo makes enough shards for resume tests.
    """
    from gap3d.pipeline.download import download, list_shards
    from gap3d.pipeline.server import free_port

    root = tmp_path_factory.mktemp("tiny_demo")
    # One partition: each img2dataset task costs ~10 s of start-up here.
    overrides = {
        "data.samples_per_shard": 4,
        "data.partition_rows": 10_000,
        "data.demo.port": free_port(),
    }
    cfg = tiny_config(root, **overrides)
    report = download(cfg)
    shards = list_shards(cfg.shards_dir)
    assert report.complete and report.successes > 0 and len(shards) >= 4, report
    return TinyData(root, overrides, shards, report.successes)


def tiny_config(workdir: Path, preset: str = "tiny", **overrides: Any) -> Gap3dConfig:
    """The ``tiny`` preset in ``workdir``; overrides as ``**{"data.samples_per_shard": 4}``."""
    items = [f"workdir={workdir}"] + [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return load_config(preset, items)
