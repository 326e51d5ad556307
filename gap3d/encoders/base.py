"""The two frozen-encoder interfaces every backend implements.

A backend only writes the model-specific parts (``_encode_batch`` for prompts, ``preprocess`` /
``_forward`` for images). Batching by ``cfg.batch_size``, eval mode, ``torch.inference_mode``,
device/dtype placement and the float32-on-CPU output contract live here, once.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from gap3d.config import ImageEncoderConfig, PromptEncoderConfig
from gap3d.layout import TokenLayout
from gap3d.progress import Progress

# Show a progress bar only when a call spans more batches than this (the encode stage calls
# the encoders once per shard; a bar per tiny call would flood the worker logs).
_PROGRESS_MIN_BATCHES = 4

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (the names allowed in the config)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}' (use one of {', '.join(_DTYPES)})") from None


def freeze(model: torch.nn.Module, device: str, dtype: str) -> torch.nn.Module:
    """Move a model to ``device``/``dtype``, switch to eval mode and drop its gradients."""
    model = model.to(device=torch.device(device), dtype=torch_dtype(dtype))
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class PromptBatch:
    """Per-token hidden states of a batch of prompts.

    ``hidden`` is ``(B, L, D)`` float32 on the CPU, ``mask`` ``(B, L)`` bool; positions where
    ``mask`` is False are padding and hold exact zeros.
    """

    hidden: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.hidden.ndim != 3 or self.mask.shape != self.hidden.shape[:2]:
            raise ValueError(
                f"PromptBatch needs hidden (B, L, D) and mask (B, L); got "
                f"{tuple(self.hidden.shape)} and {tuple(self.mask.shape)}"
            )

    def __len__(self) -> int:
        return self.hidden.shape[0]


def pack_rows(rows: Sequence[torch.Tensor], max_length: int, pad_to_max: bool) -> PromptBatch:
    """Stack variable-length ``(L_i, D)`` rows into a zero-padded :class:`PromptBatch`.

    With ``pad_to_max`` every row is padded (or truncated) to ``max_length``; truncation keeps
    the **last** ``max_length`` tokens (the rows are the valid tokens only). Without it the batch
    is padded to its longest row and nothing is truncated.
    """
    if not rows:
        raise ValueError("pack_rows needs at least one row")
    if pad_to_max:
        rows = [r[-max_length:] for r in rows]
        length = max_length
    else:
        length = max(r.shape[0] for r in rows)
    dim = rows[0].shape[-1]
    hidden = torch.zeros(len(rows), length, dim, dtype=torch.float32)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        hidden[i, : r.shape[0]] = r.detach().to("cpu", torch.float32)
        mask[i, : r.shape[0]] = True
    return PromptBatch(hidden=hidden, mask=mask)


def _batches(n: int, batch_size: int, desc: str) -> Any:
    n_batches = math.ceil(n / batch_size)
    starts = range(0, n, batch_size)
    if n_batches <= _PROGRESS_MIN_BATCHES:
        yield from starts
        return
    # a bar on a terminal, plain lines (samples/s) in a log
    with Progress(n, desc, unit="sample") as bar:
        for s in starts:
            yield s
            bar.update(min(batch_size, n - s))


def source_info(encoder: Any) -> dict[str, Any]:
    """``revision`` (the resolved commit for hub models), ``model_id`` (the exact weights)
    and ``source`` (no local paths) of a backend that pinned its ``self.source``."""
    source = getattr(encoder, "source", None)
    if source is None:  # a backend without a model spec (e.g. a registered plugin)
        return {"revision": encoder.cfg.revision}
    return {"revision": source.revision, "model_id": source.model_id, "source": source.to_dict()}


class PromptEncoder(ABC):
    """A frozen text (or text+image) encoder whose per-token hidden states get cached."""

    name: str = ""
    supports_images: bool = False
    # States before the image in a text+image prompt (a VLM's system turn): the cache's
    # keep-the-last-max_length truncation may drop these without cutting into the image.
    image_prefix_tokens: int = 0

    def __init__(self, cfg: PromptEncoderConfig) -> None:
        self.cfg = cfg
        self.max_length = cfg.max_length
        self.hidden_size = 0  # set by the backend once its model is loaded

    def format_prompt(self, caption: str) -> str:
        """The user text: the config's template with the caption filled in."""
        return self.cfg.template.format(caption=caption)

    @abstractmethod
    def _encode_batch(
        self, captions: Sequence[str], images: Sequence[Image.Image | None] | None
    ) -> list[torch.Tensor]:
        """One batch -> the valid tokens of each prompt, ``(L_i, D)`` (any device/dtype)."""

    def encode(
        self,
        captions: Sequence[str],
        images: Sequence[Image.Image | None] | None = None,
        pad_to_max: bool = True,
    ) -> PromptBatch:
        """Hidden states of ``captions`` (optionally with one image each), in batches.

        With ``pad_to_max`` the result is exactly ``(B, max_length, D)``; longer prompts keep
        their last ``max_length`` tokens (see the backend's notes).
        """
        if isinstance(captions, str):
            raise TypeError("encode() takes a list of captions, not a single string")
        captions = list(captions)
        if not captions:
            raise ValueError("encode() needs at least one caption")
        if images is not None:
            images = list(images)
            if len(images) != len(captions):
                raise ValueError(
                    f"got {len(images)} images for {len(captions)} captions; pass one image "
                    "(or None) per caption"
                )
            if not self.supports_images and any(im is not None for im in images):
                raise ValueError(
                    f"prompt encoder '{self.name}' is text-only; use qwen2_5_vl for text+image "
                    "prompts"
                )
            if all(im is None for im in images):
                images = None
        rows: list[torch.Tensor] = []
        bs = self.cfg.batch_size
        with torch.inference_mode():
            for s in _batches(len(captions), bs, f"{self.name} prompts"):
                batch_images = None if images is None else images[s : s + bs]
                rows.extend(self._encode_batch(captions[s : s + bs], batch_images))
        return pack_rows(rows, self.max_length, pad_to_max)

    def info(self) -> dict[str, Any]:
        """JSON-able description for the store manifest (backends add their own keys)."""
        return {
            "kind": "prompt_encoder",
            "name": self.name,
            "model": self.cfg.model,
            **source_info(self),
            "hidden_size": self.hidden_size,
            "max_length": self.max_length,
            "template": self.cfg.template,
            "dtype": self.cfg.dtype,
            "supports_images": self.supports_images,
        }


class ImageEncoder(ABC):
    """A frozen image encoder producing a ``[CLS, registers, patches]`` token grid."""

    name: str = ""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        self.cfg = cfg
        self.layout: TokenLayout  # set by the backend

    @abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> ``(B, 3, H, W)`` float32 model input; deterministic, no augmentation."""

    @abstractmethod
    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Model input on the model's device/dtype -> ``(B, T, C)`` tokens."""

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``(B, 3, H, W)`` pixels -> ``(B, T, C)`` float32 tokens on the CPU."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_pixels expects (B, 3, H, W), got {tuple(pixels.shape)}")
        with torch.inference_mode():
            x = pixels.to(device=self.device, dtype=torch_dtype(self.cfg.dtype))
            tokens = self._forward(x).float().cpu()
        # A plain tensor, not an inference tensor: callers may go on to use it under autograd.
        tokens = tokens.clone()
        if tokens.shape[1:] != (self.layout.n_tokens, self.layout.channels):
            raise RuntimeError(
                f"image encoder '{self.name}' returned {tuple(tokens.shape)}, but its layout "
                f"says (B, {self.layout.n_tokens}, {self.layout.channels})"
            )
        return tokens

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess and encode ``images`` in batches of ``cfg.batch_size``."""
        images = list(images)
        if not images:
            raise ValueError("encode() needs at least one image")
        bs = self.cfg.batch_size
        out = [
            self.encode_pixels(self.preprocess(images[s : s + bs]))
            for s in _batches(len(images), bs, f"{self.name} images")
        ]
        return torch.cat(out, dim=0)

    def info(self) -> dict[str, Any]:
        """JSON-able description for the store manifest (backends add their own keys)."""
        return {
            "kind": "image_encoder",
            "name": self.name,
            "model": self.cfg.model,
            **source_info(self),
            "image_size": self.cfg.image_size,
            "layout": self.layout.to_dict(),
            "hidden_size": self.layout.channels,
            "dtype": self.cfg.dtype,
        }
