"""BERT-like sentence encoder (all-MiniLM-L6-v2 in the demo): per-token hidden states.

We cache ``last_hidden_state`` of every token with the attention mask: the aligner's resampler
attends over tokens, like it does over a VLM's. Tokenisation is the model's own
(``[CLS] ... [SEP]``), truncated on the right at ``max_length`` as BERT models were trained.
Text only.

With ``prompt_encoder.pooled_token`` the model's *sentence embedding* comes first: the mean of
the token states over the attention mask, L2-normalised (how all-MiniLM-L6-v2 was trained to
be used for sentence similarity), as one more state with its mask bit; the tokens are then
truncated at ``max_length - 1``. It summarises the phrase the way the model compares phrases,
which helps with words the aligner's training captions never used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from gap3d.config import PromptEncoderConfig
from gap3d.encoders.base import PromptEncoder, freeze
from gap3d.encoders.pinning import pin_source
from gap3d.encoders.resolve import resolve_model_spec

LAYER = "last_hidden_state (token states, not pooled)"


def sentence_embedding(states: torch.Tensor) -> torch.Tensor:
    """The sentence embedding of one prompt's valid token states ``(L, D)``: their mean,
    L2-normalised (the pooling of sentence-transformers' all-MiniLM-L6-v2)."""
    return torch.nn.functional.normalize(states.float().mean(0), dim=-1).to(states.dtype)


class SentencePromptEncoder(PromptEncoder):
    """``AutoModel`` + ``AutoTokenizer`` token states."""

    name = "sentence"
    supports_images = False

    def __init__(self, cfg: PromptEncoderConfig) -> None:
        super().__init__(cfg)
        from transformers import AutoModel, AutoTokenizer

        self.source = pin_source(resolve_model_spec(cfg.model, cfg.revision))
        kwargs = self.source.pretrained_kwargs()
        self.tokenizer = AutoTokenizer.from_pretrained(self.source.location, **kwargs)
        model = AutoModel.from_pretrained(self.source.location, **kwargs)
        self.model = freeze(model, cfg.device, cfg.dtype)
        self.hidden_size = int(self.model.config.hidden_size)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and cfg.max_length > limit:
            raise ValueError(
                f"prompt_encoder.max_length={cfg.max_length} exceeds the model's "
                f"{limit} positions; lower it"
            )

    def _encode_batch(
        self, captions: Sequence[str], images: Sequence[Image.Image | None] | None
    ) -> list[torch.Tensor]:
        texts = [self.format_prompt(c) for c in captions]
        inputs = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length - (1 if self.cfg.pooled_token else 0),
            return_tensors="pt",
        ).to(torch.device(self.cfg.device))
        hidden = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].bool()
        rows = [h[m] for h, m in zip(hidden, mask, strict=True)]
        if self.cfg.pooled_token:
            rows = [torch.cat([sentence_embedding(r)[None], r]) for r in rows]
        return rows

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(
            architecture=type(self.model).__name__,
            layer=LAYER,
            truncation="right, at max_length (tokenizer)",
            pooled_token=bool(self.cfg.pooled_token),
        )
        if self.cfg.pooled_token:
            d["layer"] = f"{LAYER}; state 0 = L2-normalised mean of the token states"
            d["truncation"] = "right, at max_length - 1 (tokenizer; one state is the sentence)"
        return d
