"""Frozen encoders behind one interface (docs/ARCHITECTURE.md, "Frozen encoders").

``build_prompt_encoder(cfg.prompt_encoder)`` and ``build_image_encoder(cfg.image_encoder)``
pick a backend by name; models load from a local folder, ``pkg:<pypi-package>``,
``tiny:<arch>`` or (only when named) a model hub.
"""

from gap3d.encoders.base import ImageEncoder, PromptBatch, PromptEncoder
from gap3d.encoders.registry import (
    IMAGE_ENCODERS,
    PROMPT_ENCODERS,
    build_image_encoder,
    build_prompt_encoder,
    register_image_encoder,
    register_prompt_encoder,
)
from gap3d.encoders.resolve import ModelSource, resolve_model_spec

__all__ = [
    "IMAGE_ENCODERS",
    "PROMPT_ENCODERS",
    "ImageEncoder",
    "ModelSource",
    "PromptBatch",
    "PromptEncoder",
    "build_image_encoder",
    "build_prompt_encoder",
    "register_image_encoder",
    "register_prompt_encoder",
    "resolve_model_spec",
]
