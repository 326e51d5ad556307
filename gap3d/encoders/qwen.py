"""Qwen2.5-VL prompt encoder: last hidden state (after the final RMSNorm) of a chat prompt.

Prompt (paper; docs/METHOD.md, "Prompts"): the conversation ``[user: (image,) text,
assistant: ""]`` rendered with **the model's own chat template** (``processor.chat_template``
of the loaded folder; Qwen2.5-VL's adds its default system turn, places the image
placeholder before the text as the content list orders it, and closes the empty assistant
turn). The user text is ``cfg.template.format(caption=...)``. A model folder whose template
cannot place an image item is refused rather than silently prompted with another format.

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
kept: inference does that, so a text+image prompt keeps all of its image tokens. A prompt
image is limited to ``cfg.image_max_pixels`` pixels (Qwen2.5-VL: one token per 28 x 28), so
that its tokens fit ``max_length`` in the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from gap3d.config import PromptEncoderConfig
from gap3d.encoders.base import PromptEncoder, freeze, torch_dtype
from gap3d.encoders.image_input import BLACK, flatten_alpha
from gap3d.encoders.pinning import pin_source
from gap3d.encoders.resolve import resolve_model_spec

LAYER = "last_hidden_state of Qwen2_5_VLModel (after the final RMSNorm)"


def chat_messages(user_text: str, with_image: bool = False) -> list[dict[str, Any]]:
    """The paper's conversation: a user turn (image item first, if any) + an empty assistant
    turn; the model's chat template renders it (and adds its default system turn)."""
    content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": user_text})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]


class QwenVLPromptEncoder(PromptEncoder):
    """``Qwen2_5_VLForConditionalGeneration`` (base model only) -> per-token hidden states."""

    name = "qwen2_5_vl"
    supports_images = True

    def __init__(self, cfg: PromptEncoderConfig) -> None:
        super().__init__(cfg)
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        self.source = pin_source(resolve_model_spec(cfg.model, cfg.revision))
        kwargs = self.source.pretrained_kwargs()
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            self.source.location, dtype=torch_dtype(cfg.dtype), **kwargs
        )
        self.model = freeze(model, cfg.device, cfg.dtype)
        self.processor = AutoProcessor.from_pretrained(self.source.location, **kwargs)
        self.processor.tokenizer.padding_side = "right"
        self.hidden_size = int(self.model.config.text_config.hidden_size)
        self.chat_template = self._check_chat_template()
        self.image_max_pixels = cfg.image_max_pixels
        # tokens before <|vision_start|>: the same for every caption (the image comes first)
        before = self.render_prompt("x", with_image=True).split("<|vision_start|>")[0]
        self.image_prefix_tokens = len(self.processor.tokenizer(before)["input_ids"])

    def _check_chat_template(self) -> str:
        template = getattr(self.processor, "chat_template", None)
        if not isinstance(template, str) or not template:
            raise ValueError(
                f"prompt_encoder.model='{self.cfg.model}' has no chat template "
                "(chat_template.json / chat_template.jinja); a Qwen2.5-VL folder carries one"
            )
        image_token = getattr(self.processor, "image_token", "<|image_pad|>")
        try:
            probe = self.render_prompt("probe", with_image=True)
        except Exception as e:  # noqa: BLE001 - a template for text-only content lists
            probe = f"<cannot render an image item: {type(e).__name__}: {e}>"
        if probe.count(image_token) != 1:
            raise ValueError(
                f"the chat template of prompt_encoder.model='{self.cfg.model}' does not place "
                f"an image item as one {image_token} (rendered: {probe!r}); it is not "
                "Qwen2.5-VL's template"
            )
        return template

    def render_prompt(self, caption_text: str, with_image: bool = False) -> str:
        """The prompt string the model reads, from the model's own chat template."""
        text = self.processor.apply_chat_template(
            chat_messages(caption_text, with_image), tokenize=False, add_generation_prompt=False
        )
        return text if isinstance(text, str) else text[0]

    def _image_kwargs(self) -> dict[str, Any]:
        if not self.image_max_pixels:
            return {}
        size = dict(getattr(self.processor.image_processor, "size", None) or {})
        lo = min(int(size.get("shortest_edge", 0)), self.image_max_pixels)
        return {"size": {"shortest_edge": lo, "longest_edge": self.image_max_pixels}}

    def _encode_batch(
        self, captions: Sequence[str], images: Sequence[Image.Image | None] | None
    ) -> list[torch.Tensor]:
        imgs = list(images) if images is not None else [None] * len(captions)
        texts = [
            self.render_prompt(self.format_prompt(c), with_image=im is not None)
            for c, im in zip(captions, imgs, strict=True)
        ]
        # Callers flatten alpha with the store's policy first; black (TRELLIS) otherwise.
        present = [flatten_alpha(im, BLACK) for im in imgs if im is not None]
        extra = self._image_kwargs() if present else {}
        inputs = self.processor(
            text=texts, images=present or None, padding=True, return_tensors="pt", **extra
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
            layer=LAYER,
            chat_template_sha256=hashlib.sha256(self.chat_template.encode()).hexdigest(),
            chat_prompt=self.render_prompt(self.cfg.template),
            chat_prompt_with_image=self.render_prompt(self.cfg.template, with_image=True),
            image_max_pixels=self.image_max_pixels,
            truncation="keep the last max_length tokens (pad_to_max); padding right, zeros",
        )
        return d
