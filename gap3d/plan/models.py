"""Sizes and analytic costs of the frozen encoders, without their weights where possible.

* :func:`encoder_shapes`: the token layout and prompt width a config produces. The paper's hub
  models (and their ``shapes:`` stand-ins) are known from their published architecture
  (``gap3d.encoders.shapes``); anything else local is built with the real encoder code and
  asked (cheap for the tiny and demo models); an unknown hub model needs ``gap3d bench``.
* :func:`analytic_encoder_cost`: FLOPs, parameters, weight and activation bytes per sample of
  the paper's encoders at full depth: parameters counted on the meta device; FLOPs and
  activations on one real CPU forward of 1- and 2-layer copies with zeroed weights (no
  download, ~1 s), extrapolated per layer.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from gap3d.config import Gap3dConfig
from gap3d.layout import TokenLayout

# Prompt tokens per sample when nothing was measured: the paper's chat template around a
# 15-20 word caption is 45-50 Qwen2.5 tokens (counted with the Qwen tokenizer).
DEFAULT_PROMPT_TOKENS = 48
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class UnknownModelError(ValueError):
    """A model the planner cannot size without loading it."""


def _arch(model: str) -> str | None:
    from gap3d.encoders.shapes import arch_for_model

    return arch_for_model(model)


def encoder_shapes(cfg: Gap3dConfig) -> tuple[TokenLayout, int]:
    """``(token layout, prompt hidden size)`` that ``cfg``'s encoders produce."""
    from gap3d.encoders.shapes import DINOV2_REG_LARGE, QWEN2_5_VL_3B_TEXT

    ic, pc = cfg.image_encoder, cfg.prompt_encoder
    layout: TokenLayout | None = None
    dim: int | None = None
    if ic.name == "dinov2_reg" and _arch(ic.model) == "dinov2_reg_large":
        g = ic.image_size // DINOV2_REG_LARGE["patch_size"]
        layout = TokenLayout(
            1, DINOV2_REG_LARGE["num_register_tokens"], g, g, DINOV2_REG_LARGE["hidden_size"]
        )
    if pc.name == "qwen2_5_vl" and _arch(pc.model) == "qwen2_5_vl_3b_2layers":
        dim = QWEN2_5_VL_3B_TEXT["hidden_size"]
    if layout is None:
        layout = _built(ic.name, ic.model, ic.image_size, "image")
    if dim is None:
        dim = _built(pc.name, pc.model, pc.max_length, "prompt")
    return layout, dim


@functools.lru_cache(maxsize=32)
def _built(name: str, model: str, size: int, role: str) -> Any:
    """Build a local encoder with the real code and read its output shape."""
    from gap3d.config import ImageEncoderConfig, PromptEncoderConfig
    from gap3d.encoders import build_image_encoder, build_prompt_encoder, resolve_model_spec

    if resolve_model_spec(model).kind == "hub":
        raise UnknownModelError(
            f"cannot size {role} encoder '{model}' without loading it from the hub; run "
            "`gap3d bench` on a machine that has it and pass --calibration"
        )
    if role == "image":
        return build_image_encoder(
            ImageEncoderConfig(name=name, model=model, image_size=size)
        ).layout
    enc = build_prompt_encoder(PromptEncoderConfig(name=name, model=model, max_length=size))
    return int(enc.hidden_size)


def _forward_cost(model: Any, run: Any) -> tuple[float, float]:
    """``(FLOPs, peak activation bytes)`` of one real forward of ``model`` (weights zeroed:
    values do not matter, shapes and kernels do)."""
    from gap3d.plan.trace import LiveBytes

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    live = LiveBytes()
    for t in (*model.parameters(), *model.buffers()):
        live.add(t)  # known, so that views of weights are not taken for new tensors
    weights = live.current
    with live, torch.no_grad():
        run()
    return float(live.flops), float(live.peak - weights)


def _per_layer(costs: dict[int, tuple[float, float]], full: int) -> tuple[float, float]:
    """Costs measured at 1 and 2 layers, extrapolated to ``full`` layers."""
    (f1, a1), (f2, a2) = costs[1], costs[2]
    return f1 + (f2 - f1) * (full - 1), a1 + (a2 - a1) * (full - 1)


@functools.lru_cache(maxsize=16)
def _dinov2_cost(image_size: int) -> dict[str, float]:
    """DINOv2-L/14-reg per image: one real float32 forward of 1- and 2-layer copies (CPU
    kernels: flash attention, so no T x T matrix), extrapolated to the 24 layers."""
    from transformers import Dinov2WithRegistersModel

    from gap3d.encoders.shapes import dinov2_config

    costs = {}
    for layers in (1, 2):
        c = dinov2_config()
        c.num_hidden_layers = layers
        with torch.device("meta"):
            m = Dinov2WithRegistersModel(c).eval()
        m = m.to_empty(device="cpu")
        x = torch.zeros(1, 3, image_size, image_size)
        costs[layers] = _forward_cost(
            m, lambda m=m, x=x: m(pixel_values=x, output_hidden_states=True)
        )
    full = dinov2_config().num_hidden_layers
    flops, act = _per_layer(costs, full)
    with torch.device("meta"):
        params = sum(p.numel() for p in Dinov2WithRegistersModel(dinov2_config()).parameters())
    # (output_hidden_states keeps every layer's output alive until the forward returns)
    return {"flops_per_sample": flops, "activation_bytes_per_sample": act, "params": float(params)}


@functools.lru_cache(maxsize=16)
def _qwen_cost(tokens: int) -> dict[str, float]:
    """Qwen2.5-VL-3B per prompt of ``tokens`` tokens: real float32 forwards of uninitialised
    1- and 2-layer copies (small vocabulary: a lookup costs no FLOPs), extrapolated to 36."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from gap3d.encoders.shapes import QWEN2_5_VL_3B_TEXT, QWEN2_5_VL_3B_VISION, qwen_config

    costs = {}
    for layers in (1, 2):
        c = qwen_config(layers=layers)
        c.text_config.vocab_size = 1024
        with torch.device("meta"):
            m = Qwen2_5_VLForConditionalGeneration(c).eval()
        m = m.to_empty(device="cpu")  # the mask code needs real tensors
        ids = torch.randint(0, 1000, (1, tokens))
        am = torch.ones(1, tokens, dtype=torch.long)
        costs[layers] = _forward_cost(
            m,
            lambda m=m, ids=ids, am=am: m.model(input_ids=ids, attention_mask=am, use_cache=False),
        )
    full = QWEN2_5_VL_3B_TEXT["num_hidden_layers"]
    flops, act = _per_layer(costs, full)
    # Parameters of the real model: text (full depth, tied embeddings) + full vision tower.
    full_cfg = qwen_config(layers=full)
    full_cfg.vision_config.depth = QWEN2_5_VL_3B_VISION["depth"]
    full_cfg.vision_config.fullatt_block_indexes = QWEN2_5_VL_3B_VISION["fullatt_block_indexes"]
    with torch.device("meta"):
        params = sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(full_cfg).parameters())
    return {"flops_per_sample": flops, "activation_bytes_per_sample": act, "params": float(params)}


def analytic_encoder_cost(cfg: Gap3dConfig, role: str, tokens: int | None = None) -> dict[str, Any]:
    """FLOPs/params/weight bytes/activation bytes per sample of a known paper encoder."""
    if role == "image":
        ic = cfg.image_encoder
        if not (ic.name == "dinov2_reg" and _arch(ic.model) == "dinov2_reg_large"):
            raise UnknownModelError(f"no analytic cost model for image encoder '{ic.model}'")
        c = dict(_dinov2_cost(ic.image_size))
        nbytes = _DTYPE_BYTES[ic.dtype]
        c["activation_bytes_per_sample"] *= nbytes / 4  # measured in float32
    else:
        pc = cfg.prompt_encoder
        if not (pc.name == "qwen2_5_vl" and _arch(pc.model) == "qwen2_5_vl_3b_2layers"):
            raise UnknownModelError(f"no analytic cost model for prompt encoder '{pc.model}'")
        c = dict(_qwen_cost(int(tokens or DEFAULT_PROMPT_TOKENS)))
        nbytes = _DTYPE_BYTES[pc.dtype]
        c["activation_bytes_per_sample"] *= nbytes / 4  # measured in float32
        c["tokens_per_prompt"] = float(tokens or DEFAULT_PROMPT_TOKENS)
    c["weight_bytes"] = c["params"] * nbytes
    return c


def full_depth_flops(measured: dict[str, Any], model: str) -> tuple[float, str]:
    """FLOPs per sample of the real model a ``shapes:`` stand-in measured in a calibration
    stands for (extra decoder layers at the measured per-layer cost); ``(flops, note)``."""
    from gap3d.encoders.shapes import full_depth

    arch = _arch(model)
    flops = float(measured["flops_per_sample"])
    if arch is None:
        return flops, ""
    built, full = full_depth(arch)
    if built == full:
        return flops, ""
    layer = float(measured.get("layer_flops_per_sample") or 0.0)
    return flops + (full - built) * layer, f"measured on {built} layers, scaled to {full}"
