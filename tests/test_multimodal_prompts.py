"""Text+image prompts end to end (issue 10, item 4): which samples get an image, the cached
states include the image tokens, training runs on a store with multimodal rows, and
generation keeps every state of a text+image prompt."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gap3d.config import ConfigError, load_config
from gap3d.encoders import build_image_encoder, build_prompt_encoder
from gap3d.pipeline.decode import DecodedSample
from gap3d.pipeline.prompt_inputs import (
    PromptPolicy,
    assign_prompt_images,
    choose_prompt_images,
    encode_prompts,
)

TINY = load_config("tiny")


def sample(key: str, asset: str, colour: tuple[int, int, int] = (200, 20, 20)) -> DecodedSample:
    return DecodedSample(
        key=key,
        caption=f"a {asset} seen from the side",
        url=f"http://127.0.0.1/{key}.png",
        meta={"asset_id": asset},
        image=Image.new("RGB", (64, 64), colour),
    )


def test_choice_is_a_pure_function_of_sample_and_policy() -> None:
    samples = [sample(f"{i:04d}", f"a{i // 2}") for i in range(200)]
    half = PromptPolicy(fraction=0.5, seed=3)
    picks = [im is not None for im, _ in choose_prompt_images(samples, half)]
    assert 70 < sum(picks) < 130
    # the same samples in another order (another shard layout) get the same choice
    again = {
        s.key: im is not None
        for s, (im, _) in zip(samples[::-1], choose_prompt_images(samples[::-1], half), strict=True)
    }
    assert all(again[s.key] == p for s, p in zip(samples, picks, strict=True))
    assert not any(im for im, _ in choose_prompt_images(samples, PromptPolicy(0.0)))
    assert all(n == "self" for _, n in choose_prompt_images(samples, PromptPolicy(1.0)))
    other = PromptPolicy(fraction=1.0, source="other_view")
    for s, (im, note) in zip(samples, choose_prompt_images(samples, other), strict=True):
        partner = next(o for o in samples if o.key == note.removeprefix("view:"))
        assert partner.key != s.key and partner.meta["asset_id"] == s.meta["asset_id"]
        assert im is partner.image


def test_other_view_without_a_partner_falls_back_to_text() -> None:
    lone = [sample("k1", "a1"), sample("k2", "a2")]
    lone.append(DecodedSample(key="bad", reason="image_corrupt"))
    assign_prompt_images(lone, PromptPolicy(fraction=1.0, source="other_view"))
    for s in lone[:2]:
        assert s.prompt_image is None and s.meta["prompt_modality"] == "text"
        assert "no other view" in s.meta["prompt_image_dropped"]
    assert lone[2].meta == {}


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="text-only"):
        load_config("demo", ["data.image_prompt_fraction=0.5"])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        load_config("tiny", ["data.image_prompt_fraction=1.5"])
    cfg = load_config("tiny", ["data.image_prompt_fraction=0.25"])
    assert PromptPolicy.from_config(cfg).fraction == 0.25


@pytest.fixture(scope="module")
def qwen():  # noqa: ANN201
    return build_prompt_encoder(TINY.prompt_encoder)


def test_cached_text_image_states_include_the_image_tokens(qwen) -> None:  # noqa: ANN001
    samples = [sample("k0", "a0"), sample("k1", "a1", (20, 20, 200))]
    assign_prompt_images(samples, PromptPolicy(fraction=1.0))
    batch = encode_prompts(qwen, samples)
    assert batch.hidden.shape == (2, qwen.max_length, qwen.hidden_size)
    for i, s in enumerate(samples):
        full = qwen.encode([s.caption], images=[s.image], pad_to_max=False)
        text = qwen.encode([s.caption], pad_to_max=False)
        n = int(full.mask[0].sum())
        assert n > int(text.mask[0].sum())  # the image tokens are there ...
        assert s.meta["prompt_modality"] == "text+image" and s.meta["prompt_tokens"] == n
        kept = min(n, qwen.max_length)
        # ... and every one of them survives the cache's truncation (only the system turn
        # in front may go)
        torch.testing.assert_close(
            batch.hidden[i, :kept], full.hidden[0, n - kept : n], rtol=1e-4, atol=1e-5
        )
        assert n - kept <= qwen.image_prefix_tokens


def test_a_text_image_prompt_too_long_for_the_cache_falls_back_to_text(qwen) -> None:  # noqa: ANN001
    big = build_prompt_encoder(replace(TINY.prompt_encoder, image_max_pixels=None))
    s = sample("k0", "a0")
    s.image = Image.new("RGB", (300, 300), (200, 20, 20))
    s.caption = " ".join(["a very detailed red cube"] * 10)
    assign_prompt_images([s], PromptPolicy(fraction=1.0))
    batch = encode_prompts(big, [s])
    assert s.meta["prompt_modality"] == "text" and "would not fit" in s.meta["prompt_image_dropped"]
    text = big.encode([s.caption], pad_to_max=True)
    torch.testing.assert_close(batch.hidden, text.hidden)


def test_rows_record_their_length_even_when_no_row_of_a_batch_got_an_image(qwen) -> None:  # noqa: ANN001
    samples = [sample("k0", "a0"), sample("k1", "a1")]
    assign_prompt_images(samples, PromptPolicy(fraction=1e-9))  # active, but nobody drawn
    assert all(s.prompt_image is None for s in samples)
    batch = encode_prompts(qwen, samples)
    plain = qwen.encode([s.caption for s in samples], pad_to_max=True)
    torch.testing.assert_close(batch.hidden, plain.hidden)
    for s, m in zip(samples, plain.mask, strict=True):
        assert s.meta["prompt_modality"] == "text" and s.meta["prompt_tokens"] == int(m.sum())


def test_generation_keeps_every_state_of_a_text_image_prompt(tmp_path: Path) -> None:
    from test_pinning import export_for

    from gap3d.inference.generate import GenerateSession

    pcfg = replace(TINY.prompt_encoder, image_max_pixels=None)  # 16 image tokens per prompt
    pe, ie = build_prompt_encoder(pcfg), build_image_encoder(TINY.image_encoder)
    export = export_for(tmp_path, pe.info(), ie.info(), ie.layout)
    cfg = load_config("tiny", [f"workdir={tmp_path / 'w'}", "prompt_encoder.image_max_pixels=null"])
    session = GenerateSession(cfg, export)
    prompt, image = (
        "a small red cube seen from above, slightly tilted",
        Image.new("RGB", (112, 112), (200, 30, 30)),
    )
    batch = session.encode([prompt], [image])
    full = pe.encode([prompt], images=[image], pad_to_max=False)
    assert batch.hidden.shape[1] == int(full.mask[0].sum()) > pe.max_length
    assert batch.mask.all()
    torch.testing.assert_close(batch.hidden, full.hidden)
    tokens = session.sample(batch.hidden, batch.mask, steps=2)
    assert tokens.shape == (1, ie.layout.n_tokens, ie.layout.channels)
    assert torch.isfinite(tokens).all()


def test_cache_and_train_on_a_store_with_multimodal_rows(
    tiny_data, inproc_client, tmp_path: Path
) -> None:  # noqa: ANN001
    from gap3d.pipeline.encode import cache
    from gap3d.store import FeatureStore
    from gap3d.trainer.train import train

    cfg = tiny_data.config(
        **{
            "store.path": str(tmp_path / "mm.zarr"),
            "train.run_dir": str(tmp_path / "run"),
            "data.image_prompt_fraction": 0.6,
            "data.image_prompt_source": "other_view",
            "train.max_steps": 3,
            "train.warmup_steps": 1,
            "train.val_every_n_steps": 3,
            "train.checkpoint_every_n_steps": 3,
        }
    )
    report = cache(cfg, client=inproc_client, shards=tiny_data.shards)
    assert report.ok, report.failed
    store = FeatureStore.open(cfg.store_path)
    policy = store.manifest["extra"]["image_prompts"]
    assert policy["fraction"] == 0.6 and policy["source"] == "other_view"
    rows = store.indices()
    data = store.read(rows, fields=("prompt_mask", "meta", "caption"))
    modal = [m.get("prompt_modality") for m in data["meta"]]
    assert modal.count("text+image") >= 3 and modal.count("text") >= 3, modal
    lengths = np.asarray(data["prompt_mask"]).sum(1)
    for m, n in zip(data["meta"], lengths, strict=True):
        assert min(m["prompt_tokens"], store.prompt_max_length) == n
        if m["prompt_modality"] == "text+image":
            assert m["prompt_image"].startswith("view:")
    # the image tokens are in the cached states: 2 x 2 merged patches + vision start/end
    pe = build_prompt_encoder(cfg.prompt_encoder)
    for m, cap in zip(data["meta"], data["caption"], strict=True):
        text_len = int(pe.encode([cap], pad_to_max=False).mask.sum())
        assert m["prompt_tokens"] == text_len + (6 if m["prompt_modality"] != "text" else 0)
    result = train(cfg)
    assert result["step"] == 3
    exported = json.loads((Path(result["export_dir"]) / "aligner.json").read_text())
    assert exported["manifest"]["extra"]["image_prompts"]["fraction"] == 0.6
