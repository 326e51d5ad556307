"""Conditioning resampler: learned queries read the cached VLM hidden states.

Why this module exists (docs/METHOD.md, "Cache-once conditioning"): the GAP3D reference
feeds 64 learnable query embeddings *through* the frozen VLM, so gradients flow through the
VLM and it must run at every training step, which defeats caching. gap3d caches the VLM's
hidden states of the whole prompt once (padded to a fixed length, with a mask) and moves the
learnable queries *outside* the VLM: ``n_queries`` learned vectors cross-attend to the cached,
masked hidden states over ``resampler_depth`` pre-norm layers (cross-attention + SwiGLU MLP,
in the spirit of Perceiver / Flamingo's resampler). Same number of learnable conditioning
tokens, no VLM in the training loop. ``resampler_depth = 0`` skips the queries: the aligner's
blocks then cross-attend to the (normed, linearly projected) hidden states directly.

Classifier-free guidance null condition: for samples with ``drop_cond`` the *whole*
conditioning is replaced by a learned null value, independent of the prompt:

* depth > 0: the ``(n_queries, width)`` output is replaced by the learned ``null_tokens``
  ``(n_queries, width)``; all of them are attended to.
* depth = 0: the projected sequence ``(L, width)`` is replaced by ``[null_tokens[0], 0, ..., 0]``
  with mask ``[True, False, ..., False]``, so a dropped sample attends to the single learned
  null token only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gap3d.trainer.layers import CrossAttention, SwiGLU, swiglu_hidden


class ResamplerLayer(nn.Module):
    """Pre-norm: ``q += CrossAttn(norm(q), norm(ctx))``; ``q += MLP(norm(q))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width, eps=1e-6)
        self.norm_ctx = nn.LayerNorm(width, eps=1e-6)
        self.attn = CrossAttention(width, heads)
        self.norm_mlp = nn.LayerNorm(width, eps=1e-6)
        self.mlp = SwiGLU(width, swiglu_hidden(width, mlp_ratio))

    def forward(self, q: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        q = q + self.attn(self.norm_q(q), self.norm_ctx(ctx), mask)
        return q + self.mlp(self.norm_mlp(q))


class ConditioningResampler(nn.Module):
    """Cached prompt hidden states ``(B, L, prompt_dim)`` -> conditioning ``(B, L', width)``.

    ``L' = n_queries`` when ``depth > 0``, else ``L``. Returns ``(tokens, mask)``; see the module
    docstring for the null condition used where ``drop_cond`` is True.
    """

    def __init__(
        self,
        prompt_dim: int,
        width: int,
        heads: int,
        n_queries: int,
        depth: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"resampler depth must be >= 0, got {depth}")
        if depth > 0 and n_queries <= 0:
            raise ValueError(f"n_queries must be > 0 with a resampler, got {n_queries}")
        self.prompt_dim = prompt_dim
        self.depth = depth
        self.n_queries = n_queries if depth > 0 else 0
        # LayerNorm first: VLM last hidden states differ in scale between models.
        self.in_norm = nn.LayerNorm(prompt_dim, eps=1e-6)
        self.in_proj = nn.Linear(prompt_dim, width)
        if depth > 0:
            self.queries = nn.Parameter(torch.randn(n_queries, width) * 0.02)
            self.layers = nn.ModuleList(
                [ResamplerLayer(width, heads, mlp_ratio) for _ in range(depth)]
            )
            self.out_norm = nn.LayerNorm(width, eps=1e-6)
        n_null = n_queries if depth > 0 else 1
        self.null_tokens = nn.Parameter(torch.randn(n_null, width) * 0.02)

    def forward(
        self, hidden: Tensor, mask: Tensor, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if hidden.ndim != 3 or hidden.shape[-1] != self.prompt_dim:
            raise ValueError(
                f"prompt hidden states must be (B, L, {self.prompt_dim}), got "
                f"{tuple(hidden.shape)}; was the store written with another prompt encoder?"
            )
        if mask.shape != hidden.shape[:2]:
            raise ValueError(f"prompt mask {tuple(mask.shape)} must be {tuple(hidden.shape[:2])}")
        mask = mask.bool()
        ctx = self.in_proj(self.in_norm(hidden))
        if self.depth > 0:
            tokens = self.queries.to(ctx.dtype).expand(hidden.shape[0], -1, -1)
            for layer in self.layers:
                tokens = layer(tokens, ctx, mask)
            tokens = self.out_norm(tokens)
            out_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            null = self.null_tokens.to(tokens.dtype).expand_as(tokens)
            null_mask = out_mask
        else:
            tokens, out_mask = ctx, mask
            null = torch.zeros_like(tokens)
            null[:, :1] = self.null_tokens.to(tokens.dtype)
            null_mask = torch.zeros_like(mask)
            null_mask[:, 0] = True
        if drop_cond is not None:
            drop = drop_cond.to(device=tokens.device, dtype=torch.bool)
            tokens = torch.where(drop[:, None, None], null, tokens)
            out_mask = torch.where(drop[:, None], null_mask, out_mask)
        return tokens, out_mask
