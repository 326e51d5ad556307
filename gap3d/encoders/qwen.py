"""Qwen2.5-VL prompt encoder: last hidden state (after the final RMSNorm) of a chat prompt.

Prompt (paper; docs/METHOD.md, "Prompts"): Qwen2.5-VL's default system turn, a user turn holding
``cfg.template.format(caption=...)`` (preceded by the image placeholder for a text+image
prompt, as Qwen2.5-VL's chat template lays out ``[image, text]`` content), then an **empty
assistant turn** - exactly what the chat template renders for
``[user, {"role": "assistant", "content": ""}]``. We write the string ourselves because the
template bundled with the tokenizer does not handle image content lists.

Which output is post-norm (transformers 5.24): ``Qwen2_5_VLTextModel.forward`` applies
``self.norm`` and returns it as ``last_hidden_state``; we call the base ``Qwen2_5_VLModel``
(``model.model``) and read ``last_hidden_state``, which also skips the LM head (a 151k-way
projection we do not need). ``tests/test_encoders.py`` checks this against a hand-computed
RMSNorm of the last decoder layer's output.

Padding is on the right, so with causal attention the states of real tokens do not depend on
the padding or on the batch. Long prompts are never truncated at the input (cutting an image's
placeholder tokens would break the vision tower): the model sees the whole prompt, and with
``pad_to_max`` the **last** ``max_length`` states are kept (the end of the caption and the
assistant turn; the constant system turn goes first). With ``pad_to_max=False`` every token is
kept - use that for text+image prompts whose image tokens exceed ``max_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from gap3d.config import PromptEncoderConfig
from gap3d.encoders.base import PromptEncoder, freeze, torch_dtype
from gap3d.encoders.resolve import resolve_model_spec

# Qwen2.5-VL chat template's default system message.
DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
LAYER = "last_hidden_state of Qwen2_5_VLModel (after the final RMSNorm)"


def build_chat_prompt(
    user_text: str, with_image: bool = False, system: str = DEFAULT_SYSTEM
) -> str:
    """System turn, user turn (image placeholder first if any), empty assistant turn."""
    image = IMAGE_PLACEHOLDER if with_image else ""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{image}{user_text}<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n"
    )


class QwenVLPromptEncoder(PromptEncoder):
    """``Qwen2_5_VLForConditionalGeneration`` (base model only) -> per-token hidden states."""

    name = "qwen2_5_vl"
    supports_images = True

    def __init__(self, cfg: PromptEncoderConfig) -> None:
        super().__init__(cfg)
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        self.source = resolve_model_spec(cfg.model, cfg.revision)
        kwargs = self.source.pretrained_kwargs()
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            self.source.location, dtype=torch_dtype(cfg.dtype), **kwargs
        )
        self.model = freeze(model, cfg.device, cfg.dtype)
        self.processor = AutoProcessor.from_pretrained(self.source.location, **kwargs)
        self.processor.tokenizer.padding_side = "right"
        self.hidden_size = int(self.model.config.text_config.hidden_size)

    def _encode_batch(
        self, captions: Sequence[str], images: Sequence[Image.Image | None] | None
    ) -> list[torch.Tensor]:
        imgs = list(images) if images is not None else [None] * len(captions)
        texts = [
            build_chat_prompt(self.format_prompt(c), with_image=im is not None)
            for c, im in zip(captions, imgs, strict=True)
        ]
        present = [im.convert("RGB") for im in imgs if im is not None]
        inputs = self.processor(
            text=texts, images=present or None, padding=True, return_tensors="pt"
        )
        device = torch.device(self.cfg.device)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype(self.cfg.dtype))
        hidden = self.model.model(**inputs, use_cache=False).last_hidden_state
        mask = inputs["attention_mask"].bool()
        return [h[m] for h, m in zip(hidden, mask, strict=True)]

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(
            architecture=type(self.model).__name__,
            source=self.source.to_dict(),
            layer=LAYER,
            chat_prompt=build_chat_prompt(self.cfg.template),
            truncation="keep the last max_length tokens (pad_to_max); padding right, zeros",
        )
        return d
