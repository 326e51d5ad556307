"""The aligner network: a flow-matching transformer over an image encoder's token grid.

Sequence ``[CLS, R registers, H*W patches]`` (any counts, from :class:`TokenLayout`), each role
embedded by its own linear map (CLS and every register also get a learned role vector, patches
a learned absolute position); 2-D RoPE on the patch grid (identity for CLS/registers);
QK-normalised self-attention; cross-
attention to the conditioning tokens of :class:`ConditioningResampler` in every block; SwiGLU
MLP; timestep conditioning by adaLN; one zero-initialised output head back to ``C`` channels.

adaLN design: "adaLN-single" of PixArt-alpha (Chen et al. 2023, arXiv 2310.00426). One shared
``Linear(width, 6 * width)`` maps the timestep embedding to (shift, scale, gate) x 2 and every
block adds its own learned ``(6, width)`` table. DiT's per-block adaLN MLP would cost another
``6 * width**2`` per block (0.46 B more at the paper size: 1.81 B instead of 1.35 B). The shared
projection and the tables start at zero, so every gate is zero at init and each block starts as
the identity (DiT's adaLN-Zero, Peebles & Xie 2023, arXiv 2212.09748).

Sizes are one-line presets in :data:`ALIGNER_PRESETS`; see :func:`count_parameters`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gap3d.config import AlignerConfig
from gap3d.layout import TokenLayout
from gap3d.trainer.layers import (
    CrossAttention,
    SelfAttention,
    SwiGLU,
    TimestepEmbedder,
    modulate,
    rope_2d_tables,
    swiglu_hidden,
)
from gap3d.trainer.resampler import ConditioningResampler

# Sizes. mlp_ratio 8/3 with SwiGLU = the parameter count of a GELU MLP of ratio 4.
# Counts below are for DINOv2-L-reg tokens (1374 x 1024), Qwen2.5-VL-3B latents (2048-d),
# 64 queries, resampler depth 2 (see tests/test_model.py, which prints and checks them).
ALIGNER_PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests.
    "tiny": dict(width=64, depth=2, heads=4, mlp_ratio=8 / 3),
    # ~55 M params: trains on one 24 GB consumer GPU at 1374 tokens.
    "small": dict(width=512, depth=10, heads=8, mlp_ratio=8 / 3),
    # ~0.31 B params: one 24-48 GB GPU at 1374 tokens (bf16; gradient checkpointing at 24 GB).
    "base": dict(width=1024, depth=16, heads=16, mlp_ratio=8 / 3),
    # Paper reference (arXiv 2605.28995): width 1792, 24 layers, 28 heads, ~1.35 B params (+4 %).
    "paper": dict(width=1792, depth=24, heads=28, mlp_ratio=8 / 3),
}


def resolve_aligner_size(cfg: AlignerConfig) -> dict[str, Any]:
    """``dict(width, depth, heads, mlp_ratio)``: the preset with the config's non-null fields."""
    if cfg.preset not in ALIGNER_PRESETS:
        raise ValueError(
            f"unknown aligner preset '{cfg.preset}' (available: {', '.join(ALIGNER_PRESETS)})"
        )
    sizes = dict(ALIGNER_PRESETS[cfg.preset])
    for key in ("width", "depth", "heads", "mlp_ratio"):
        value = getattr(cfg, key)
        if value is not None:
            sizes[key] = value
    width, heads = int(sizes["width"]), int(sizes["heads"])
    if width % heads or (width // heads) % 4:
        raise ValueError(
            f"aligner width {width} / heads {heads} must give an integer head dimension "
            "divisible by 4 (2-D RoPE rotates two pairs per axis); change aligner.width or "
            "aligner.heads"
        )
    if int(sizes["depth"]) < 1 or float(sizes["mlp_ratio"]) <= 0:
        raise ValueError(f"aligner depth must be >= 1 and mlp_ratio > 0, got {sizes}")
    return dict(
        width=width, depth=int(sizes["depth"]), heads=heads, mlp_ratio=float(sizes["mlp_ratio"])
    )


# Smallest t in the x0 -> v conversion: bounds the 1/t^2 weight the v-loss puts on x0 errors.
X0_T_MIN = 0.05


class AlignerBlock(nn.Module):
    """adaLN-modulated self-attention (gated) -> cross-attention -> adaLN SwiGLU (gated)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm_cross = nn.LayerNorm(width, eps=1e-6)
        self.cross = CrossAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(width, swiglu_hidden(width, mlp_ratio))
        self.mod_table = nn.Parameter(torch.zeros(6, width))  # adaLN-single, zero = identity

    def forward(
        self,
        x: Tensor,
        t_mod: Tensor,
        rope: tuple[Tensor, Tensor],
        cond: Tensor,
        cond_mask: Tensor,
    ) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (t_mod + self.mod_table).unbind(1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        x = x + self.cross(self.norm_cross(x), cond, cond_mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class AlignerNet(nn.Module):
    """Velocity network ``v = net(x_t, t, cond, cond_mask, drop_cond)`` of the aligner.

    Args:
        layout: token layout of the image encoder (CLS / registers / patch grid / channels).
        prompt_dim: hidden size ``D`` of the cached prompt latents.
        cfg: size preset and overrides, ``n_queries`` and ``resampler_depth``.
    """

    def __init__(self, layout: TokenLayout, prompt_dim: int, cfg: AlignerConfig) -> None:
        super().__init__()
        self.layout = layout
        self.prompt_dim = prompt_dim
        self.sizes = resolve_aligner_size(cfg)
        self.n_queries = cfg.n_queries
        self.resampler_depth = cfg.resampler_depth
        self.prediction = cfg.prediction
        # aligner.grad_checkpointing: trade compute for memory at paper token counts
        self.grad_checkpointing = bool(getattr(cfg, "grad_checkpointing", False))
        w, heads, c = self.sizes["width"], self.sizes["heads"], layout.channels

        self.patch_embed = nn.Linear(c, w)
        # Learned absolute position of each patch (as in ViT / DINOv2), on top of RoPE: RoPE
        # only exposes *relative* offsets, and at t = 1 the patch inputs are pure noise, so
        # without it a patch cannot tell where it is. Measured on a toy overfit (4x4 grid,
        # 200 steps): patch loss 0.86 with it vs 1.44 with RoPE alone.
        self.patch_pos = nn.Parameter(torch.randn(layout.n_patches, w) * 0.02)
        # Roles without tokens get no parameters at all: an unused parameter would make DDP fail.
        self.cls_embed = nn.Linear(c, w) if layout.n_cls else None
        self.cls_role = nn.Parameter(torch.randn(layout.n_cls, w) * 0.02) if layout.n_cls else None
        self.reg_embed = nn.Linear(c, w) if layout.n_registers else None
        self.reg_role = (
            nn.Parameter(torch.randn(layout.n_registers, w) * 0.02) if layout.n_registers else None
        )
        cos, sin = rope_2d_tables(
            layout.n_cls + layout.n_registers, layout.grid_h, layout.grid_w, w // heads
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.t_embed = TimestepEmbedder(w)
        self.t_mod = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w))
        self.resampler = ConditioningResampler(
            prompt_dim, w, heads, cfg.n_queries, cfg.resampler_depth, self.sizes["mlp_ratio"]
        )
        self.blocks = nn.ModuleList(
            [AlignerBlock(w, heads, self.sizes["mlp_ratio"]) for _ in range(self.sizes["depth"])]
        )
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_table = nn.Parameter(torch.zeros(2, w))
        self.head = nn.Linear(w, c)
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier for linear maps (DiT); adaLN and the head at zero (adaLN-Zero, DiT sec. 3.2).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.t_mod[1].weight)
        nn.init.zeros_(self.t_mod[1].bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embed_tokens(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        """Per-role input embedding of ``x (B, T, C)`` -> ``(B, T, width)``.

        ``scale (B,)`` multiplies the input per sample; it is applied after the (linear)
        projection, ``W (s x) + b = s (W x) + b``, i.e. on ``width`` instead of ``C`` channels.
        """
        lay = self.layout

        def embed(lin: nn.Linear, part: Tensor) -> Tensor:
            if scale is None:
                return lin(part)
            s = scale.to(part.dtype)[:, None, None]
            return torch.addcmul(lin.bias, F.linear(part, lin.weight), s)

        parts = []
        if self.cls_embed is not None:
            parts.append(embed(self.cls_embed, x[:, lay.cls_slice]) + self.cls_role)
        if self.reg_embed is not None:
            parts.append(embed(self.reg_embed, x[:, lay.register_slice]) + self.reg_role)
        parts.append(embed(self.patch_embed, x[:, lay.patch_slice]) + self.patch_pos)
        return torch.cat(parts, dim=1)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: Tensor,
        cond_mask: Tensor,
        drop_cond: Tensor | None = None,
        raw: bool = False,
    ) -> Tensor:
        """Velocity ``(B, T, C)`` at noisy tokens ``x_t (B, T, C)`` and times ``t (B,)``.

        ``cond (B, L, D)`` / ``cond_mask (B, L)`` are the cached prompt hidden states and their
        mask; where ``drop_cond (B,)`` is True the whole conditioning is replaced by the learned
        null condition (classifier-free guidance). ``raw=True`` returns the head's output
        itself (the clean-token estimate for ``prediction="x0"``; the loss uses it directly).
        """
        lay = self.layout
        if x_t.ndim != 3 or x_t.shape[1:] != (lay.n_tokens, lay.channels):
            raise ValueError(
                f"x_t must be (B, {lay.n_tokens}, {lay.channels}) for layout {lay}, "
                f"got {tuple(x_t.shape)}"
            )
        if t.shape != x_t.shape[:1]:
            raise ValueError(f"t must be (B,) = ({x_t.shape[0]},), got {tuple(t.shape)}")
        c, c_mask = self.resampler(cond, cond_mask, drop_cond)
        t_emb = self.t_embed(t)
        t_mod = self.t_mod(t_emb).unflatten(1, (6, -1))
        rope = (self.rope_cos, self.rope_sin)
        if self.prediction == "x0":
            # The noise part of x_t carries nothing an x0-head needs (v's noise path is the
            # analytic (x_t - x0_hat) / t), yet at t -> 1 its embedding swamps the learned patch
            # positions; fade the input with the signal level (1 - t). Measured on the demo:
            # patch cosine at t = 1 stalled at 0.59 (mean-feature baseline 0.80) without this.
            h = self.embed_tokens(x_t, scale=1.0 - t)
        else:
            h = self.embed_tokens(x_t)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h = checkpoint(block, h, t_mod, rope, c, c_mask, use_reentrant=False)
            else:
                h = block(h, t_mod, rope, c, c_mask)
        shift, scale = (self.final_table[None] + t_emb[:, None]).unbind(1)
        out = self.head(modulate(self.final_norm(h), shift, scale))
        if self.prediction == "x0" and not raw:
            # x0-parameterised velocity (Li & He 2025, "Back to Basics: Let Denoising Generative
            # Models Denoise"): the head predicts clean tokens and v = (x_t - x0_hat) / t, since
            # x_t = (1 - t) x0 + t eps. A width narrower than the token channels (demo: 256 vs
            # 1280) cannot carry the noise through to a v output; clean tokens are low-rank.
            return (x_t - out) / t.clamp_min(X0_T_MIN)[:, None, None]
        return out


def count_parameters(
    cfg: AlignerConfig | str, layout: TokenLayout | None = None, prompt_dim: int = 2048
) -> int:
    """Parameter count of an :class:`AlignerNet` built on the meta device (no memory used).

    ``cfg`` may be a preset name (then the paper's 64 queries / resampler depth 2 are used);
    the default layout is DINOv2-L/14-reg at 518 px and ``prompt_dim`` Qwen2.5-VL-3B's 2048.
    """
    if isinstance(cfg, str):
        cfg = AlignerConfig(preset=cfg, n_queries=64, resampler_depth=2)  # type: ignore[arg-type]
    layout = layout or TokenLayout(1, 4, 37, 37, 1024)
    with torch.device("meta"):
        net = AlignerNet(layout, prompt_dim, dataclasses.replace(cfg))
    return sum(p.numel() for p in net.parameters())
