"""DINOv2 with registers, producing exactly TRELLIS's conditioning tokens.

TRELLIS (``TrellisImageTo3DPipeline.encode_image``) takes the DINOv2 ViT-L/14-reg output of the
last block *before* the model's final norm (``x_prenorm``) and applies ``F.layer_norm`` without
affine parameters. In transformers' ``Dinov2WithRegistersModel`` that pre-norm tensor is
``hidden_states[-1]`` (the encoder records block outputs without tying the last one to
``last_hidden_state``, which went through the affine ``layernorm``). Token order is the
model's: ``[CLS, 4 registers, H*W patches row-major]`` (docs/METHOD.md, "Token contract").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from gap3d.config import ImageEncoderConfig
from gap3d.encoders.base import ImageEncoder, freeze
from gap3d.encoders.pinning import pin_source
from gap3d.encoders.preprocess import IMAGENET_MEAN, IMAGENET_STD, build_preprocessing
from gap3d.encoders.resolve import resolve_model_spec
from gap3d.layout import TokenLayout

LAYER = "layer_norm(hidden_states[-1]), no affine"


def trellis_tokens(hidden_last: torch.Tensor) -> torch.Tensor:
    """TRELLIS's conditioning from the last block's output: a layer norm with no affine."""
    return F.layer_norm(hidden_last, hidden_last.shape[-1:])


class Dinov2RegEncoder(ImageEncoder):
    """``Dinov2WithRegistersModel`` -> ``(B, 1 + R + (S/14)^2, C)`` TRELLIS tokens."""

    name = "dinov2_reg"

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__(cfg)
        from transformers import Dinov2WithRegistersModel

        self.source = pin_source(resolve_model_spec(cfg.model, cfg.revision))
        model = Dinov2WithRegistersModel.from_pretrained(
            self.source.location, **self.source.pretrained_kwargs()
        )
        self.model = freeze(model, cfg.device, cfg.dtype)
        mcfg = self.model.config
        patch = int(mcfg.patch_size)
        if cfg.image_size % patch:
            raise ValueError(
                f"image_encoder.image_size={cfg.image_size} is not a multiple of the DINOv2 "
                f"patch size {patch}; use e.g. {cfg.image_size // patch * patch or patch}"
            )
        grid = cfg.image_size // patch
        # The position embeddings are interpolated (bicubic) to this grid inside the model
        # whenever it differs from the one the weights were trained at.
        self.layout = TokenLayout(
            1, int(mcfg.num_register_tokens), grid, grid, int(mcfg.hidden_size)
        )
        self.preprocessing = build_preprocessing(cfg, IMAGENET_MEAN, IMAGENET_STD)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.preprocessing(images)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return trellis_tokens(out.hidden_states[-1])

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(
            architecture=type(self.model).__name__,
            preprocessing=self.preprocessing.to_dict(),
            layer=LAYER,
            native_image_size=int(self.model.config.image_size),
        )
        return d
