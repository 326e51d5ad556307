"""Token normaliser and the aligner export format (round trip, clear errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gap3d.config import AlignerConfig
from gap3d.layout import TokenLayout
from gap3d.trainer.export import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ExportError,
    load_aligner,
    save_export,
)
from gap3d.trainer.flow import FlowMatching
from gap3d.trainer.model import AlignerNet
from gap3d.trainer.normalize import TokenNormalizer

LAYOUT = TokenLayout(1, 2, 3, 2, 8)
PROMPT_DIM = 12


def store_stats(layout: TokenLayout = LAYOUT, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = layout.channels
    return {
        "cls_mean": rng.normal(size=c),
        "cls_std": rng.uniform(0.5, 2, size=c),
        "register_mean": rng.normal(size=(layout.n_registers, c)),
        "register_std": rng.uniform(0.5, 2, size=(layout.n_registers, c)),
        "patch_mean": rng.normal(size=c),
        "patch_std": rng.uniform(0.5, 2, size=c),
    }


def test_normalizer_roundtrip_and_identity() -> None:
    stats = store_stats()
    norm = TokenNormalizer(LAYOUT, stats)
    x = torch.randn(4, LAYOUT.n_tokens, LAYOUT.channels)
    z = norm.normalize(x)
    torch.testing.assert_close(norm.denormalize(z), x, rtol=1e-5, atol=1e-5)
    # Per-role values: CLS uses (C,) stats, registers per-token (n, C) stats.
    torch.testing.assert_close(
        z[:, 0],
        (x[:, 0] - torch.tensor(stats["cls_mean"]).float())
        / torch.tensor(stats["cls_std"]).float(),
    )
    torch.testing.assert_close(
        z[:, 2],
        (x[:, 2] - torch.tensor(stats["register_mean"][1]).float())
        / torch.tensor(stats["register_std"][1]).float(),
    )
    ident = TokenNormalizer(LAYOUT, None)
    assert not ident.enabled and torch.equal(ident.normalize(x), x)
    back = TokenNormalizer.from_state_dict(LAYOUT, norm.state_dict())
    assert torch.equal(back.normalize(x), z)
    with pytest.raises(KeyError, match="patch_mean"):
        TokenNormalizer(LAYOUT, {k: v for k, v in stats.items() if k != "patch_mean"})
    with pytest.raises(ValueError, match="shape"):
        TokenNormalizer(LAYOUT, {**stats, "patch_std": np.ones(3)})


def make_net(depth: int = 1) -> AlignerNet:
    torch.manual_seed(0)
    net = AlignerNet(
        LAYOUT, PROMPT_DIM, AlignerConfig(preset="tiny", n_queries=4, resampler_depth=depth)
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial outputs: fill the zero-initialised parameters
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def prompts(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(b, 7, PROMPT_DIM, generator=g)
    mask = torch.ones(b, 7, dtype=torch.bool)
    mask[1, 3:] = False
    return hidden, mask


@pytest.mark.parametrize("normalize", [True, False])
def test_export_roundtrip_is_bit_identical(tmp_path, normalize: bool) -> None:
    net = make_net()
    norm = TokenNormalizer(LAYOUT, store_stats() if normalize else None)
    cfg = AlignerConfig(preset="tiny", n_queries=4, resampler_depth=1, normalize_targets=normalize)
    out = save_export(
        tmp_path / "export",
        net,
        norm,
        aligner_cfg=cfg,
        layout=LAYOUT,
        prompt_dim=PROMPT_DIM,
        prompt_max_length=7,
        manifest={"prompt_encoder": {"name": "fake"}},
        extra={"step": np.int64(12), "val/patch_cosine": torch.tensor(0.5)},
    )
    assert (out / WEIGHTS_NAME).is_file() and (out / CONFIG_NAME).is_file()
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["extra"] == {"step": 12, "val/patch_cosine": 0.5}
    assert meta["aligner"]["width"] == 64 and meta["aligner"]["normalize_targets"] is normalize

    loaded = load_aligner(out)
    assert loaded.layout == LAYOUT and loaded.prompt_dim == PROMPT_DIM
    assert loaded.prompt_max_length == 7 and loaded.manifest["prompt_encoder"]["name"] == "fake"
    assert loaded.normalizer.enabled is normalize
    hidden, mask = prompts()
    got = loaded.sample(hidden.numpy(), mask.numpy(), steps=3, cfg_scale=2.0, seed=11)
    # Reference: the original objects, same seed, de-normalised.
    x0 = FlowMatching(net, LAYOUT).sample(
        hidden, mask, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(11)
    )
    assert torch.equal(got, norm.denormalize(x0))
    assert torch.equal(got, loaded.sample(hidden, mask, steps=3, cfg_scale=2.0, seed=11))


def test_n_samples_rows_are_prompt_major(tmp_path) -> None:
    net = make_net(depth=0)
    save_export(
        tmp_path,
        net,
        TokenNormalizer(LAYOUT, None),
        aligner_cfg=AlignerConfig(preset="tiny", n_queries=4, resampler_depth=0),
        layout=LAYOUT,
        prompt_dim=PROMPT_DIM,
        prompt_max_length=7,
        manifest={},
        extra={},
    )
    loaded = load_aligner(tmp_path / CONFIG_NAME)
    hidden, mask = prompts()
    out = loaded.sample(hidden, mask, steps=2, cfg_scale=3.0, seed=0, n_samples=3)
    assert out.shape == (6, LAYOUT.n_tokens, LAYOUT.channels)
    assert not torch.equal(out[0], out[1])  # different noise per sample
    with pytest.raises(ValueError, match="prompt hidden states"):
        loaded.sample(hidden[..., :5], mask)


def test_clear_errors_for_bad_exports(tmp_path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        load_aligner(tmp_path / "nope")
    with pytest.raises(ExportError, match="no aligner.json"):
        load_aligner(tmp_path)
    net = make_net()
    out = save_export(
        tmp_path / "e",
        net,
        TokenNormalizer(LAYOUT, None),
        aligner_cfg=AlignerConfig(preset="tiny", n_queries=4, resampler_depth=1),
        layout=LAYOUT,
        prompt_dim=PROMPT_DIM,
        prompt_max_length=7,
    )
    meta = json.loads((out / CONFIG_NAME).read_text())
    meta["aligner"]["depth"] = 3
    (out / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="do not fit"):
        load_aligner(out)
    weights = out / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="checksum"):
        load_aligner(out)
    weights.unlink()
    with pytest.raises(ExportError, match="no aligner.safetensors"):
        load_aligner(out)
    (out / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        load_aligner(out)
    with pytest.raises(ValueError, match="differ from the network"):
        save_export(
            tmp_path / "f",
            net,
            TokenNormalizer(LAYOUT, None),
            aligner_cfg=AlignerConfig(preset="tiny", n_queries=4, resampler_depth=1),
            layout=TokenLayout(1, 2, 2, 3, 8),
            prompt_dim=PROMPT_DIM,
            prompt_max_length=7,
        )
