"""Robust sample decoding: every bad-input case is converted or marked, never raised."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest_pipeline import (
    MAX_CAPTION,
    MAX_PIXELS,
    BadCase,
    bad_cases,
    png_header_only,
    write_shard_tar,
    write_truncated_tar,
)
from PIL import Image

from gap3d.pipeline.decode import (
    REASONS,
    decode_any,
    decode_image,
    decode_sample,
    thumbnail,
)
from gap3d.pipeline.tars import TarStream, read_tar


def _decode(case: BadCase):
    return decode_sample({"__key__": case.key, **case.entries}, MAX_PIXELS, MAX_CAPTION)


@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c.key)
def test_each_case_is_converted_or_marked(case: BadCase) -> None:
    d = _decode(case)
    assert d.key == case.key
    assert d.reason == case.reason, d.meta
    assert d.split == case.split
    for k in case.meta_keys:
        assert k in d.meta, (k, d.meta)
    if case.reason:
        assert d.image is None and not d.valid
        assert case.reason in REASONS
        return
    x = case.extra
    assert d.valid and d.image is not None
    # transparency is kept for the encoder's alpha policy; everything else is plain RGB
    assert d.image.mode == ("RGBA" if x.get("alpha_left") else "RGB") or case.key == "palette_alpha"
    if x.get("alpha_left"):  # alpha kept as it was: left half transparent, right half opaque
        alpha = np.asarray(d.image.getchannel("A"))
        assert alpha[:, :20].max() == 0 and alpha[:, 20:].min() == 255 and d.meta["alpha"]
    arr = np.asarray(d.image.convert("RGB"))
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    if "size" in x:
        assert d.image.size == x["size"]
    if "asset_id" in x:
        assert d.meta["asset_id"] == x["asset_id"]
    if "caption" in x:
        assert d.caption == x["caption"]
    if "caption_len" in x:
        assert 0 < len(d.caption) <= x["caption_len"]
        assert d.meta["caption_truncated_from"] > MAX_CAPTION
    if x.get("red"):
        r, g, b = arr.reshape(-1, 3).mean(0)
        assert r > 200 and g < 60 and b < 60
    if x.get("not_saturated"):  # 16-bit scaled to 8 bit, not clipped to white
        assert arr.min() < 10 and 100 < arr.mean() < 200


def test_exif_rotation_moves_pixels() -> None:
    # Left half dark, right half bright; orientation 6 = rotate 90 clockwise for display, so
    # the dark half ends up at the top.
    a = np.zeros((30, 40, 3), np.uint8)
    a[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", exif=exif, quality=95)
    meta: dict = {}
    im = decode_image(buf.getvalue(), MAX_PIXELS, meta)
    arr = np.asarray(im).mean(-1)
    assert im.size == (30, 40) and meta["exif_orientation"] == 6
    assert arr[:18].mean() < 30 and arr[22:].mean() > 220


def test_bomb_uses_pil_guard_without_raising_global_limit() -> None:
    # Our limit above PIL's: PIL's DecompressionBombError path must still be caught.
    limit_before = Image.MAX_IMAGE_PIXELS
    meta: dict = {}
    assert decode_image(png_header_only(30_000, 30_000), 10**12, meta) == "image_too_large"
    # Between 1x and 2x PIL's limit PIL only warns; that warning is a bomb too.
    side = int((limit_before * 1.5) ** 0.5)
    assert decode_image(png_header_only(side, side), 10**12, {}) == "image_too_large"
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_unknown_extension_case_and_dot_keys() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, "PNG")
    d = decode_sample({"__key__": "k", ".PNG": buf.getvalue(), ".TXT": "blue"}, MAX_PIXELS, 50)
    assert d.valid and d.caption == "blue"


def test_thumbnail() -> None:
    t = thumbnail(Image.new("RGB", (100, 50), (10, 20, 30)))
    assert t.shape == (64, 64, 3) and t.dtype == np.uint8 and (t == [10, 20, 30]).all()
    assert not thumbnail(None).any()


def test_read_tar_keeps_order_and_groups(tmp_path: Path) -> None:
    cases = bad_cases()
    path = write_shard_tar(tmp_path / "00000.tar", cases)
    tar = read_tar(path)
    assert tar.error is None
    assert [s["__key__"] for s in tar.samples] == [c.key for c in cases]
    for s, c in zip(tar.samples, cases, strict=True):
        assert {k for k in s if not k.startswith("__")} == set(c.entries)
    decoded = [decode_any(s, MAX_PIXELS, MAX_CAPTION) for s in tar.samples]
    assert [d.reason for d in decoded] == [c.reason for c in cases]


@pytest.mark.parametrize("keep", [0, 3, 7])
def test_truncated_tar_keeps_samples_before_damage(tmp_path: Path, keep: int) -> None:
    cases = bad_cases()[:8]
    path = write_truncated_tar(tmp_path / "t.tar", cases, keep_complete=keep)
    tar = read_tar(path)
    assert tar.error and tar.truncated_key == cases[keep].key
    assert [s["__key__"] for s in tar.samples] == [c.key for c in cases[: keep + 1]]
    last = decode_any(tar.samples[-1], MAX_PIXELS, MAX_CAPTION)
    assert last.reason == "sample_truncated"


def test_tar_cut_at_member_boundary_is_noticed(tmp_path: Path) -> None:
    # tarfile reads a file cut exactly between members as a clean end; we must not.
    cases = bad_cases()[:4]
    raw = write_shard_tar(tmp_path / "a.tar", cases).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        boundary = tf.getmembers()[len(cases[0].entries)].offset
    (tmp_path / "b.tar").write_bytes(raw[:boundary])
    tar = read_tar(tmp_path / "b.tar")
    assert tar.error and "truncated" in tar.error
    assert [s.get("__truncated__", False) for s in tar.samples] == [True]


@pytest.mark.parametrize("content", [b"", b"this is not a tar file" * 30])
def test_unreadable_tar(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x.tar").write_bytes(content)
    tar = read_tar(tmp_path / "x.tar")
    assert tar.samples == [] and tar.error


def test_oversize_member_is_skipped_unread(tmp_path: Path) -> None:
    """A member above data.max_member_bytes marks its sample invalid without being read
    (tarfile skips its data block by block); the samples around it are kept."""
    cases = bad_cases()[:3]
    path = write_shard_tar(tmp_path / "o.tar", cases)
    sizes = {
        c.key: max(len(v if isinstance(v, bytes) else str(v).encode()) for v in c.entries.values())
        for c in cases
    }
    limit = sorted(sizes.values())[-1] - 1  # the largest member of the shard is over it
    big = max(sizes, key=sizes.get)
    stream = TarStream(path, max_member_bytes=limit)
    samples = list(stream)
    assert stream.error is None and [s["__key__"] for s in samples] == [c.key for c in cases]
    over = [s for s in samples if "__oversize__" in s]
    assert [s["__key__"] for s in over] == [big]
    assert all(isinstance(v, int) and v > limit for v in over[0]["__oversize__"].values())
    d = decode_any(over[0], MAX_PIXELS, MAX_CAPTION)
    assert d.reason == "member_too_large" and "member_too_large" in REASONS
