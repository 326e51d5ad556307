"""open_clip towers as frozen encoders: per-token text states and the ViT image token grid.

Model specs: ``tiny:openclip`` or a local folder holding ``open_clip_config.json`` + weights
(loaded through open_clip's ``local-dir:`` path), ``hf-hub:<org>/<repo>``, or a built-in
architecture with a pretrained tag written ``<arch>@<tag>`` (e.g. ``ViT-B-32@laion2b_s34b_b79k``).
The last two download weights, so they only run when the user names them.

Text: the states after ``ln_final`` for every token, before pooling and projection; the mask
covers ``[SOT] ... [EOT]`` (the tokenizer's EOT marks the end; the text tower is causal, so the
states of valid tokens do not depend on the padding). Prompts are tokenised at
``min(max_length, context_length)`` tokens, so truncation keeps the start and ends with EOT.

Image: class token + patch grid after ``ln_post`` (applied to every token, before pooling and
``proj``), width = the vision transformer's width -> ``TokenLayout(1, 0, g, g, width)``.
Preprocessing is open_clip's own validation transform (resize shorter side, centre crop,
the model's mean/std; no augmentation), at ``image_encoder.image_size`` (open_clip resizes the
position embeddings on load when it differs from the checkpoint's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from gap3d.config import ImageEncoderConfig, PromptEncoderConfig
from gap3d.encoders.base import ImageEncoder, PromptEncoder, freeze
from gap3d.encoders.pinning import pin_source
from gap3d.encoders.preprocess import IMAGENET_MEAN, IMAGENET_STD, build_preprocessing
from gap3d.encoders.resolve import ModelSource, resolve_model_spec
from gap3d.layout import TokenLayout


def open_clip_name(source: ModelSource) -> tuple[str, str | None]:
    """``(model_name, pretrained)`` arguments for ``open_clip.create_model``."""
    if source.kind != "hub":
        if not (source.path / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"model '{source.spec}': {source.path} has no open_clip_config.json"
            )
        return f"local-dir:{source.path}", None
    spec = source.spec
    if spec.startswith("hf-hub:"):
        return spec, None
    if "@" in spec:
        arch, tag = spec.split("@", 1)
        return arch, tag
    raise ValueError(
        f"open_clip model '{spec}' needs weights: write 'hf-hub:<org>/<repo>', "
        f"'<arch>@<pretrained-tag>' (e.g. ViT-B-32@laion2b_s34b_b79k), a local folder, or "
        "tiny:openclip"
    )


class _Capture:
    """Forward hook keeping the last output of one module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self.value = output

    def pop(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("the hooked module did not run")
        value, self.value = self.value, None
        return value


class OpenClipTextEncoder(PromptEncoder):
    """open_clip text tower -> per-token states after ``ln_final``."""

    name = "openclip_text"
    supports_images = False

    def __init__(self, cfg: PromptEncoderConfig) -> None:
        super().__init__(cfg)
        import open_clip

        self.source = pin_source(resolve_model_spec(cfg.model, cfg.revision))
        model_name, pretrained = open_clip_name(self.source)
        model = open_clip.create_model(model_name, pretrained=pretrained)
        self.model = freeze(model, cfg.device, cfg.dtype)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        tower = getattr(self.model, "text", self.model)  # CustomTextCLIP keeps it in .text
        ln_final = getattr(tower, "ln_final", None)
        if ln_final is None or getattr(tower, "cls_emb", None) is not None:
            raise ValueError(
                f"open_clip model '{cfg.model}' has no standard text transformer with "
                "ln_final (HF-text or CoCa towers are not supported)"
            )
        self._ln_final = _Capture(ln_final)
        self.context_length = int(getattr(tower, "context_length", 77))
        self.hidden_size = int(ln_final.normalized_shape[0])

    def _encode_batch(
        self, captions: Sequence[str], images: Sequence[Image.Image | None] | None
    ) -> list[torch.Tensor]:
        texts = [self.format_prompt(c) for c in captions]
        n = min(self.max_length, self.context_length)
        ids = self.tokenizer(texts, context_length=n)
        # The tower needs exactly context_length positions; pad ids are 0 (masked below).
        ids = torch.nn.functional.pad(ids, (0, self.context_length - ids.shape[1]))
        ids = ids.to(torch.device(self.cfg.device))
        self.model.encode_text(ids)
        states = self._ln_final.pop()
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if eot is not None:
            last = (ids == eot).int().argmax(dim=1)  # first EOT
            mask = torch.arange(ids.shape[1], device=ids.device)[None] <= last[:, None]
        else:
            mask = ids != 0
        return [h[m] for h, m in zip(states, mask, strict=True)]

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(
            architecture=type(self.model).__name__,
            layer="text tokens after ln_final (before pooling/projection)",
            context_length=self.context_length,
            truncation="tokenised at min(max_length, context_length), ends with EOT",
        )
        return d


class OpenClipImageEncoder(ImageEncoder):
    """open_clip ViT image tower -> ``[class token, patches]`` after ``ln_post``."""

    name = "openclip"

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__(cfg)
        import open_clip

        self.source = pin_source(resolve_model_spec(cfg.model, cfg.revision))
        model_name, pretrained = open_clip_name(self.source)
        model, _, self.transform = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, force_image_size=cfg.image_size
        )
        self.model = freeze(model, cfg.device, cfg.dtype)
        visual = self.model.visual
        if not hasattr(visual, "class_embedding") or getattr(visual, "attn_pool", None):
            raise ValueError(
                f"open_clip model '{cfg.model}' has no plain ViT image tower (timm, ResNet "
                "and attention-pool towers are not supported)"
            )
        self._transformer = _Capture(visual.transformer)
        gh, gw = visual.grid_size
        width = int(visual.class_embedding.shape[-1])
        self.layout = TokenLayout(1, 0, int(gh), int(gw), width)
        # mean/std here are unused: open_clip's transform normalises (see info())
        self.prep = build_preprocessing(cfg, IMAGENET_MEAN, IMAGENET_STD)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        # open_clip's transform would drop alpha (convert("RGB")); the alpha step (reference
        # mode) or TRELLIS's crop (trellis mode) comes first, shared with every encoder.
        return torch.stack([self.transform(self.prep.flatten(im)) for im in images]).float()

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        visual(pixels)
        x = self._transformer.pop()
        if not getattr(visual.transformer, "batch_first", True):
            x = x.transpose(0, 1)
        return visual.ln_post(x)

    def info(self) -> dict[str, Any]:
        d = super().info()
        steps = list(getattr(self.transform, "transforms", []))
        norm = next((t for t in steps if hasattr(t, "mean")), None)
        resize = next((t for t in steps if hasattr(t, "interpolation")), None)
        interp = getattr(getattr(resize, "interpolation", None), "value", None)
        d.update(
            architecture=type(self.model.visual).__name__,
            layer="[class token, patches] after ln_post (before pooling/proj)",
            preprocessing={
                **{k: v for k, v in self.prep.to_dict().items() if k not in ("mean", "std")},
                "image_size": self.cfg.image_size,
                "resize": type(resize).__name__ if resize is not None else None,
                "crop": "center",
                "interpolation": interp,
                "mean": list(norm.mean) if norm is not None else None,
                "std": list(norm.std) if norm is not None else None,
                "transform": repr(self.transform),
            },
        )
        return d
