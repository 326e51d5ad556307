"""Sample the aligner over many prompts in batches, with a progress line (eval, new words)."""

from __future__ import annotations

from typing import Any

import torch

from gap3d.config import Gap3dConfig
from gap3d.progress import Progress


def sample_batches(
    aligner: Any,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    cfg: Gap3dConfig,
    device: Any,
    seed: int,
    desc: str,
    unit: str,
) -> torch.Tensor:
    """One token grid per prompt row, ``(N, T, C)`` float32 on the CPU.

    Batches of ``train.batch_size`` prompts; ``eval.steps`` Euler steps at ``eval.cfg_scale``;
    batch ``i`` is seeded ``seed + i`` so a result does not depend on what else is sampled.
    """
    bs = max(1, cfg.train.batch_size)
    chunks = []
    with Progress(len(hidden), desc, unit=unit) as bar:
        for i in range(0, len(hidden), bs):
            tokens = aligner.sample(
                hidden[i : i + bs].to(device),
                mask[i : i + bs].to(device),
                steps=cfg.eval.steps,
                cfg_scale=cfg.eval.cfg_scale,
                seed=seed + i,
                n_samples=1,
            )
            chunks.append(tokens.float().cpu())
            bar.update(min(bs, len(hidden) - i))
    return torch.cat(chunks)
