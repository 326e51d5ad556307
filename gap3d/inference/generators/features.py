"""``features`` generator: write the tokens for an external generator, nothing else.

``features.safetensors`` holds the full sequences plus each role separately (the patch grid
already reshaped to ``(B, grid_h, grid_w, C)``), and ``features.json`` says what they are:
layout, image-encoder info from the store manifest, dtype and how to load them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gap3d.config import Gap3dConfig
from gap3d.inference.generators.base import Generator, check_tokens, layout_from_manifest
from gap3d.layout import TokenLayout


class FeaturesGenerator(Generator):
    """Writes ``features.safetensors`` + ``features.json``."""

    name = "features"

    def __init__(self, layout: TokenLayout, image_encoder_info: dict[str, Any] | None = None):
        super().__init__(layout)
        self.image_encoder_info = image_encoder_info or {}

    def generate(self, tokens: torch.Tensor, out_dir: Path, prompt: str) -> dict[str, Any]:
        check_tokens(tokens, self.layout, "features generator")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        lay = self.layout
        t = tokens.detach().to("cpu", torch.float32).contiguous()
        tensors = {
            "tokens": t,
            "cls": t[:, lay.cls_slice].contiguous(),
            "registers": t[:, lay.register_slice].contiguous(),
            "patches": t[:, lay.patch_slice].reshape(-1, lay.grid_h, lay.grid_w, lay.channels),
        }
        # clone: views of one tensor share storage, which safetensors refuses to write
        save_file(
            {k: v.clone().contiguous() for k, v in tensors.items()},
            str(out_dir / "features.safetensors"),
        )
        info = {
            "prompt": prompt,
            "layout": lay.to_dict(),
            "order": "[CLS, registers, patches row-major]",
            "dtype": "float32",
            "space": "image encoder output space (de-normalised, as stored in the feature store)",
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "image_encoder": self.image_encoder_info,
            "load": "safetensors.torch.load_file('features.safetensors')['tokens']",
        }
        (out_dir / "features.json").write_text(json.dumps(info, indent=2))
        return {"files": ["features.safetensors", "features.json"], "n_samples": int(t.shape[0])}


def build(cfg: Gap3dConfig, manifest: dict[str, Any]) -> FeaturesGenerator:
    return FeaturesGenerator(layout_from_manifest(manifest), manifest.get("image_encoder"))
