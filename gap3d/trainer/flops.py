"""Analytic FLOPs of the aligner: the numerator of model FLOPs utilisation (MFU).

Counts the matrix multiplications of :class:`gap3d.trainer.model.AlignerNet` from its sizes,
2 FLOPs per multiply-add (the convention of MFU, e.g. PaLM, Chowdhery et al. 2022, arXiv
2204.02311, appendix B): every ``nn.Linear``, and the two products of each attention
(``Q K^T`` and ``softmax V``). Normalisations, activations, RoPE and the optimizer are not
counted; they are the overhead MFU exposes.

Backward costs two matmuls per forward matmul (gradient of the input and of the weight),
except where the input needs no gradient: the token embedding (its input is the noisy
tokens) and the first layer of the timestep MLP (its input is the sinusoidal features). Attention products need
both input gradients. ``tests/test_flops.py`` checks these counts against
``torch.utils.flop_counter`` on a real forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gap3d.layout import TokenLayout
from gap3d.trainer.layers import swiglu_hidden

__all__ = ["AlignerFlops", "aligner_flops"]


@dataclass
class AlignerFlops:
    """FLOPs of one sample: forward, backward and their sum (one training step's share)."""

    forward: int
    backward: int

    @property
    def train(self) -> int:
        return self.forward + self.backward

    def per_step(self, batch: int) -> int:
        return self.train * batch


def _linear(n: int, d_in: int, d_out: int) -> int:
    return 2 * n * d_in * d_out


def aligner_flops(
    layout: TokenLayout,
    prompt_len: int,
    prompt_dim: int,
    sizes: dict[str, Any],
    n_queries: int,
    resampler_depth: int,
) -> AlignerFlops:
    """Matmul FLOPs per sample of the aligner at ``sizes`` (width, depth, heads, mlp_ratio)."""
    w, depth, ratio = int(sizes["width"]), int(sizes["depth"]), float(sizes["mlp_ratio"])
    hidden = swiglu_hidden(w, ratio)
    t, c, length = layout.n_tokens, layout.channels, prompt_len

    fwd_w = 0  # matmuls with a weight (backward: 2x, or 1x where the input needs no grad)
    fwd_a = 0  # attention products (backward: 2x)
    no_input_grad = 0  # forward FLOPs whose input needs no gradient

    # resampler: project the (layer-normed, hence gradient-carrying) cached states, then
    # queries cross-attend over depth layers
    fwd_w += _linear(length, prompt_dim, w)
    n_ctx = length
    if resampler_depth > 0:
        q = n_queries
        for _ in range(resampler_depth):
            fwd_w += _linear(q, w, w) + _linear(length, w, 2 * w) + _linear(q, w, w)
            fwd_a += 2 * (2 * q * length * w)
            fwd_w += _linear(q, w, 2 * hidden) + _linear(q, hidden, w)
        n_ctx = n_queries
    # timestep embedding (256 frequencies -> width -> width) and the adaLN projection
    t_in = _linear(1, 256, w)
    fwd_w += t_in + _linear(1, w, w) + _linear(1, w, 6 * w)
    no_input_grad += t_in
    # per-role token embeddings
    emb = _linear(t, c, w)
    fwd_w += emb
    no_input_grad += emb
    for _ in range(depth):
        fwd_w += _linear(t, w, 3 * w) + _linear(t, w, w)  # self-attention qkv, out
        fwd_a += 2 * (2 * t * t * w)
        fwd_w += _linear(t, w, w) + _linear(n_ctx, w, 2 * w) + _linear(t, w, w)  # cross
        fwd_a += 2 * (2 * t * n_ctx * w)
        fwd_w += _linear(t, w, 2 * hidden) + _linear(t, hidden, w)  # SwiGLU
    fwd_w += _linear(t, w, c)  # head
    forward = fwd_w + fwd_a
    backward = 2 * fwd_w - no_input_grad + 2 * fwd_a
    return AlignerFlops(forward=forward, backward=backward)
