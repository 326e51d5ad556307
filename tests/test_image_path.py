"""One image path and two preprocessing modes (issue 10, items 1-2).

The cache path (shard bytes -> decode -> encoders) and the encoder called directly give the
same tokens for the same RGBA picture; the alpha policy and the mode are in the manifest; the
``trellis`` mode reproduces TRELLIS's crop / premultiply / LANCZOS geometry.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gap3d.config import load_config
from gap3d.encoders import build_image_encoder, build_prompt_encoder
from gap3d.encoders.image_input import flatten_alpha, load_image, normalize_mode
from gap3d.encoders.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrellisPreprocessing,
    background_remover,
)
from gap3d.pipeline.decode import decode_sample, thumbnail
from gap3d.pipeline.workers import EncodeLimits, Encoders, encode_samples
from gap3d.store.manifest import StoreSpec, incompatibilities

TINY = load_config("tiny")
DEMO = load_config("demo")


def rgba_object(w: int = 120, h: int = 90) -> Image.Image:
    """A red disc with a soft (partly transparent) rim on a transparent, green-tinted field:
    hidden colour under alpha 0 must never reach an encoder."""
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(xx - 70, yy - 40)
    alpha = np.clip((30 - r) * 40, 0, 255).astype(np.uint8)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = 210, np.where(alpha > 0, 40, 250)
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_pair() -> Encoders:
    return Encoders(
        build_prompt_encoder(TINY.prompt_encoder), build_image_encoder(TINY.image_encoder)
    )


@pytest.mark.parametrize("background", [[0, 0, 0], [255, 255, 255], [214, 214, 209]])
def test_cache_path_and_encoder_give_identical_tokens(
    tiny_pair: Encoders, background: list[int], tmp_path: Path
) -> None:
    image = build_image_encoder(replace(TINY.image_encoder, alpha_background=background))
    enc = Encoders(tiny_pair.prompt, image)
    raw = png_bytes(rgba_object())
    sample = {"__key__": "k0", "png": raw, "txt": b"a red disc"}
    decoded = decode_sample(sample, 10**8, 1000)
    assert decoded.valid and decoded.image.mode == "RGBA" and decoded.meta["alpha"]
    limits = EncodeLimits(10**8, 1000)
    cached = next(encode_samples(enc, [sample], limits)).image_tokens[0]
    (tmp_path / "x.png").write_bytes(raw)
    direct = image.encode([Image.open(tmp_path / "x.png")])[0].numpy()
    np.testing.assert_array_equal(cached, direct)  # the same path, bit for bit
    # generate --image / the retrieval library read files through the same function
    np.testing.assert_array_equal(
        np.asarray(load_image(tmp_path / "x.png")), np.asarray(decoded.image)
    )
    # and the policy is what the manifest says: flattening by hand onto that colour agrees
    flat = flatten_alpha(rgba_object(), background)
    torch.testing.assert_close(image.encode([flat])[0], torch.from_numpy(direct))
    info = image.info()["preprocessing"]
    assert info["mode"] == "reference" and info["alpha_background"] == background


def test_hidden_colour_under_alpha_zero_never_matters(tiny_pair: Encoders) -> None:
    a = rgba_object()
    arr = np.asarray(a).copy()
    arr[..., 1] = np.where(arr[..., 3] == 0, 0, arr[..., 1])  # other hidden colour
    b = Image.fromarray(arr, "RGBA")
    torch.testing.assert_close(tiny_pair.image.encode([a]), tiny_pair.image.encode([b]))


def test_normalize_mode_keeps_alpha_only_when_it_matters() -> None:
    meta: dict = {}
    assert normalize_mode(rgba_object(), meta).mode == "RGBA" and meta["alpha"]
    opaque = Image.new("RGBA", (8, 8), (1, 2, 3, 255))
    assert normalize_mode(opaque).mode == "RGB"
    la = Image.new("LA", (8, 8), (100, 0))
    assert normalize_mode(la).mode == "RGBA"
    # the thumbnail is a preview: transparent shows as white, object colours stay
    thumb = thumbnail(rgba_object(), 32)
    assert thumb.shape == (32, 32, 3) and thumb[0, 0].tolist() == [255, 255, 255]


def test_modes_are_recorded_and_stores_do_not_mix_them() -> None:
    ref = build_image_encoder(TINY.image_encoder)
    tre = build_image_encoder(replace(TINY.image_encoder, preprocessing="trellis"))
    p = tre.info()["preprocessing"]
    assert p["mode"] == "trellis" and p["interpolation"] == "lanczos"
    assert p["background_removal"] == "none"
    assert "rembg not installed" in p["background_removal_detail"]

    def spec(info: dict) -> StoreSpec:
        return StoreSpec(ref.layout, 8, 4, 1, 4, image_encoder=info)

    diffs = incompatibilities(spec(ref.info()), spec(tre.info()))
    assert [d[0] for d in diffs] == ["image_encoder.preprocessing"]


# ------------------------------------------------------------------------- trellis geometry


def trellis(size: int = 56, remover=None) -> TrellisPreprocessing:  # noqa: ANN001
    return TrellisPreprocessing(size, IMAGENET_MEAN, IMAGENET_STD, remover=remover)


def test_trellis_premultiplies_onto_black_with_8_bit_truncation() -> None:
    colour, a = (201, 99, 50), 230  # alpha above the 0.8 threshold: all of it is the object
    im = Image.new("RGBA", (40, 40), (*colour, a))
    # box side 39 -> crop int(39 * 1.2) = 46 px; at 46 px the resize is the identity
    out = np.asarray(trellis(46).rgb(im))
    expect = [int(np.float32(c / 255) * np.float32(a / 255) * 255) for c in colour]
    assert out[23, 23].tolist() == expect == [181, 89, 45]  # truncated, not rounded
    # the 1.2 margin around the object is black: transparent padding premultiplied
    assert out[1, 1].tolist() == [0, 0, 0] and out[1, 23].tolist() == [0, 0, 0]
    assert out[4, 4].tolist() == expect  # crop box (-3.5, -3.5, 42.5, 42.5) rounds to -4


def test_trellis_crops_a_square_around_the_alpha_box() -> None:
    arr = np.zeros((100, 200, 4), np.uint8)
    arr[30:70, 50:90] = (220, 20, 20, 255)  # the object: 40 x 40 px, off-centre
    arr[0:5, 150:200] = (0, 200, 0, 150)  # faint (alpha <= 0.8): not part of the box
    out = np.asarray(trellis(92).rgb(Image.fromarray(arr, "RGBA")))
    red = out[..., 0] > 100
    ys, xs = np.nonzero(red)
    # box (50, 30)-(89, 69), side 39 -> a 46 px square around its centre (69.5, 49.5): the
    # box (46.5, 26.5, 92.5, 72.5), which PIL rounds to (46, 26, 92, 72); the object then
    # spans 4..43 of it, i.e. centre 47.5 and 80 px after scaling 2x to 92 px
    assert abs(xs.mean() - 47.5) < 0.6 and abs(ys.mean() - 47.5) < 0.6
    assert 79 <= xs.max() - xs.min() + 1 <= 82 and 79 <= ys.max() - ys.min() + 1 <= 82
    assert (out[..., 1] > 100).sum() == 0  # the faint green lies outside the crop


def test_trellis_without_alpha_uses_the_picture_or_a_remover() -> None:
    photo = Image.new("RGB", (100, 100), (10, 120, 230))
    whole = np.asarray(trellis(118).rgb(photo))
    # no remover: the whole picture is the object (1.2x margin -> a black frame)
    assert whole[59, 59].tolist() == [10, 120, 230] and whole[2, 59].tolist() == [0, 0, 0]
    calls = []

    def left_half_only(im: Image.Image) -> Image.Image:
        calls.append(im.size)
        rgba = np.dstack([np.asarray(im), np.zeros(im.size[::-1], np.uint8)])
        rgba[:, :50, 3] = 255
        return Image.fromarray(rgba, "RGBA")

    cut = np.asarray(trellis(56, left_half_only).rgb(photo))
    assert calls == [(100, 100)] and cut[28, 28].tolist() == [10, 120, 230]
    # an image that has alpha never goes to the remover
    trellis(56, left_half_only).rgb(rgba_object())
    assert len(calls) == 1


def test_background_removal_setting() -> None:
    pytest.importorskip("PIL")
    try:
        import rembg  # noqa: F401

        pytest.skip("rembg is installed here")
    except ImportError:
        pass
    assert background_remover("auto")[0] is None
    assert background_remover("none")[0] is None
    with pytest.raises(ImportError, match="pip install rembg"):
        background_remover("rembg")


def test_efficientnet_trellis_mode_and_demo_policy() -> None:
    enc = build_image_encoder(replace(DEMO.image_encoder, preprocessing="trellis"))
    pix = enc.preprocess([rgba_object()])
    assert pix.shape == (1, 3, 224, 224)
    # premultiplied black background, in EfficientNet's [-1, 1] normalisation
    torch.testing.assert_close(pix[0, :, 0, 0], torch.full((3,), -1.0))
    assert DEMO.image_encoder.alpha_background == [214, 214, 209]


# ---------------------------------------------------------------------------- demo renders


def test_rgba_render_composited_on_the_backdrop_is_the_old_render() -> None:
    from gap3d.pipeline.render import BACKGROUND, rgba_from_render

    rng = np.random.default_rng(0)
    mask = np.zeros((40, 40), bool)
    mask[8:30, 5:33] = True
    mask[8, 5] = False
    obj = rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)
    bg = np.round(np.asarray(BACKGROUND) * 255).astype(np.uint8)
    colour = np.where(mask[..., None], obj, bg)  # what pyrender returns over the backdrop
    rgba = rgba_from_render(colour, mask, 2)
    assert rgba.shape == (20, 20, 4)
    assert rgba[0, 0, 3] == 0 and rgba[10, 10, 3] == 255 and 0 < rgba[4, 2, 3] < 255
    old = colour.astype(np.float64).reshape(20, 2, 20, 2, 3).mean(axis=(1, 3))
    flat = np.asarray(flatten_alpha(Image.fromarray(rgba, "RGBA"), bg.tolist()), np.float64)
    assert np.abs(flat - old).max() <= 1.0  # rounding only
