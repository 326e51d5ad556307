"""One place that maps an encoder name from the config to its implementation.

Entries are ``"module:Class"`` strings imported on first use, so building the demo's
EfficientNet never imports transformers and a missing optional backend only fails when named.
Other code (or a user's plugin) can add a backend with :func:`register_prompt_encoder` /
:func:`register_image_encoder`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from gap3d.config import ImageEncoderConfig, PromptEncoderConfig
from gap3d.encoders.base import ImageEncoder, PromptEncoder

Factory = Callable[[Any], Any]

PROMPT_ENCODERS: dict[str, str | Factory] = {
    "qwen2_5_vl": "gap3d.encoders.qwen:QwenVLPromptEncoder",
    "sentence": "gap3d.encoders.sentence:SentencePromptEncoder",
    "openclip_text": "gap3d.encoders.openclip:OpenClipTextEncoder",
}
IMAGE_ENCODERS: dict[str, str | Factory] = {
    "dinov2_reg": "gap3d.encoders.dinov2:Dinov2RegEncoder",
    "openclip": "gap3d.encoders.openclip:OpenClipImageEncoder",
    "efficientnet_lite0": "gap3d.encoders.efficientnet:EfficientNetLite0Encoder",
}


def register_prompt_encoder(name: str, factory: str | Factory) -> None:
    """Add (or replace) a prompt encoder: ``factory(cfg) -> PromptEncoder`` or "module:Class"."""
    PROMPT_ENCODERS[name] = factory


def register_image_encoder(name: str, factory: str | Factory) -> None:
    """Add (or replace) an image encoder: ``factory(cfg) -> ImageEncoder`` or "module:Class"."""
    IMAGE_ENCODERS[name] = factory


def _quiet_loading_bars() -> None:
    """No "Loading weights" bars from transformers in a log (stdout not a terminal): a bar
    redrawn with carriage returns is one unreadable line there."""
    from gap3d.progress import plain_output

    if plain_output():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _factory(table: dict[str, str | Factory], name: str, what: str) -> Factory:
    if name not in table:
        raise ValueError(f"unknown {what} '{name}' (available: {', '.join(sorted(table))})")
    entry = table[name]
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


def build_prompt_encoder(cfg: PromptEncoderConfig) -> PromptEncoder:
    """The frozen prompt encoder named by ``cfg.name`` (eval mode, no gradients)."""
    _quiet_loading_bars()
    encoder = _factory(PROMPT_ENCODERS, cfg.name, "prompt encoder")(cfg)
    if not isinstance(encoder, PromptEncoder):
        raise TypeError(f"prompt encoder '{cfg.name}' built a {type(encoder).__name__}")
    return encoder


def build_image_encoder(cfg: ImageEncoderConfig) -> ImageEncoder:
    """The frozen image encoder named by ``cfg.name`` (eval mode, no gradients)."""
    _quiet_loading_bars()
    encoder = _factory(IMAGE_ENCODERS, cfg.name, "image encoder")(cfg)
    if not isinstance(encoder, ImageEncoder):
        raise TypeError(f"image encoder '{cfg.name}' built a {type(encoder).__name__}")
    return encoder
