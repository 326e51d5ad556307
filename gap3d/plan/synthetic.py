"""Webdataset shards for calibration runs: synthetic, or re-packed from the user's own.

``gap3d bench`` must exercise the real encode stage without downloading anything: these tars
hold what img2dataset writes per sample (``<key>.jpg`` at ``data.download_image_size`` on the
shorter side, JPEG quality 95 as img2dataset's default, ``<key>.txt`` caption, ``<key>.json``
with url/key/status/size), so the stage reads, decodes and encodes them exactly like downloaded
shards. Images are procedural (gradients, shapes and noise: JPEG sizes between a render and a
photo), captions come from the demo's caption generator. Content is a pure function of the
seed. Compressed sizes depend on content, so :func:`repack_shards` lets a calibration run on
the first samples of shards ``gap3d download`` already wrote instead.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gap3d.pipeline.captions import COLOUR_SYNONYMS, SHAPE_SYNONYMS, make_caption

JPEG_QUALITY = 95  # img2dataset's default encode_quality
_SHAPES = [s for s in SHAPE_SYNONYMS if s not in ("cuboid",)]
_COLOURS = [c for c in COLOUR_SYNONYMS if c not in ("gray", "violet")]


def synthetic_image(rng: np.random.Generator, short_side: int) -> Image.Image:
    """A procedural RGB image with ``short_side`` pixels on its shorter side."""
    aspect = float(rng.choice([1.0, 4 / 3, 3 / 2]))
    w, h = (round(short_side * aspect), short_side)
    if rng.random() < 0.5:
        w, h = h, w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, size=(2, 3))
    t = (xx / max(w - 1, 1) * 0.6 + yy / max(h - 1, 1) * 0.4)[..., None]
    arr = base[0] * (1 - t) + base[1] * t
    arr += rng.normal(0, 6.0, size=arr.shape)  # sensor-like noise: photos are not flat
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
        x1, y1 = x0 + rng.uniform(w * 0.1, w * 0.5), y0 + rng.uniform(h * 0.1, h * 0.5)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=fill)
    return im


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tf.addfile(info, io.BytesIO(data))


def write_synthetic_shards(
    out_dir: str | Path,
    n_samples: int,
    samples_per_shard: int,
    image_size: int,
    seed: int = 0,
) -> list[Path]:
    """Write ``ceil(n_samples / samples_per_shard)`` tars into ``out_dir``; returns their paths."""
    if n_samples < 1 or samples_per_shard < 1 or image_size < 8:
        raise ValueError(
            f"need n_samples >= 1, samples_per_shard >= 1, image_size >= 8; got {n_samples}, "
            f"{samples_per_shard}, {image_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0x5A11])
    paths: list[Path] = []
    for s, lo in enumerate(range(0, n_samples, samples_per_shard)):
        path = out / f"{s:05d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(lo, min(n_samples, lo + samples_per_shard)):
                key = f"{s:05d}{i - lo:04d}"
                im = synthetic_image(rng, image_size)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=JPEG_QUALITY)
                caption = make_caption(str(rng.choice(_SHAPES)), str(rng.choice(_COLOURS)), rng)
                meta = {
                    "url": f"http://synthetic.invalid/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": im.width,
                    "height": im.height,
                    "caption": caption,
                    "split": "train",
                }
                _add(tf, f"{key}.jpg", buf.getvalue())
                _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps(meta).encode())
        tmp.replace(path)
        paths.append(path)
    return paths


def repack_shards(
    sources: list[Path], out_dir: str | Path, n_samples: int, samples_per_shard: int
) -> tuple[list[Path], int]:
    """The first ``n_samples`` samples of webdataset tars ``sources`` (e.g. what
    ``gap3d download`` wrote), re-packed into tars of ``samples_per_shard`` samples, members
    copied byte for byte: a calibration on the user's own data. Returns (paths, samples)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tf_out: tarfile.TarFile | None = None
    count, key = 0, None

    def start_shard() -> tarfile.TarFile:
        path = out / f"{len(paths):05d}.tar"
        paths.append(path)
        return tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    for src in sources:
        with tarfile.open(src) as tf_in:
            for m in tf_in:
                if not m.isfile():
                    continue
                k = m.name.rsplit("/", 1)[-1].split(".", 1)[0]
                if k != key:  # a new sample starts
                    if count == n_samples:
                        break
                    if count % samples_per_shard == 0:
                        if tf_out is not None:
                            tf_out.close()
                        tf_out = start_shard()
                    key, count = k, count + 1
                data = tf_in.extractfile(m)
                assert tf_out is not None
                _add(tf_out, m.name.rsplit("/", 1)[-1], data.read() if data else b"")
        if count == n_samples:
            break
    if tf_out is not None:
        tf_out.close()
    return paths, count
