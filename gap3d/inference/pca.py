"""PCA-RGB maps of a patch-token grid: the usual way to eyeball DINO-style features.

The patch tokens of one or more token grids are projected onto their first three principal
components, each component is scaled to ``[0, 1]`` with robust (1st/99th percentile) bounds,
and the three become the R, G, B channels of an ``grid_h x grid_w`` image.

**Joint vs. per-image fit.** By default (``joint=True``) one PCA basis is fitted on the patches
of *all* grids passed together, so the same colour means the same feature direction in every
map: this is what makes "generated vs. true" panels comparable. ``joint=False`` fits a basis
per grid, which shows each grid's own structure with maximum contrast but whose colours cannot
be compared across maps. ``gap3d generate`` writes ``pca.png`` with the joint fit over its
``n_samples`` samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from gap3d.layout import TokenLayout

__all__ = ["PCABasis", "fit_pca", "pca_rgb", "patch_grid", "save_pca_panel"]


@dataclass
class PCABasis:
    """Mean, three principal directions and per-component display bounds."""

    mean: torch.Tensor  # (C,)
    components: torch.Tensor  # (C, 3)
    lo: torch.Tensor  # (3,)
    hi: torch.Tensor  # (3,)

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        """``(..., C)`` patches -> ``(..., 3)`` colours in ``[0, 1]``."""
        z = (patches.float() - self.mean) @ self.components
        return ((z - self.lo) / (self.hi - self.lo).clamp_min(1e-8)).clamp(0.0, 1.0)


def patch_grid(tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``(B, T, C)`` token sequences -> ``(B, grid_h, grid_w, C)`` patch grids."""
    if tokens.ndim != 3 or tokens.shape[1] != layout.n_tokens or tokens.shape[2] != layout.channels:
        raise ValueError(
            f"tokens must have shape (B, {layout.n_tokens}, {layout.channels}) for layout "
            f"{layout}, got {tuple(tokens.shape)}"
        )
    patches = tokens[:, layout.patch_slice]
    return patches.reshape(tokens.shape[0], layout.grid_h, layout.grid_w, layout.channels)


def fit_pca(patches: torch.Tensor) -> PCABasis:
    """Fit a 3-component PCA on ``(N, C)`` patch vectors (exact SVD of the centred data)."""
    x = patches.reshape(-1, patches.shape[-1]).double()
    if x.shape[0] < 2:
        raise ValueError("PCA needs at least two patch vectors")
    mean = x.mean(0)
    xc = x - mean
    # Full SVD on (N, C) is cheap at our sizes (N <= a few thousand patches).
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    k = min(3, vh.shape[0])
    comps = torch.zeros(x.shape[1], 3, dtype=torch.float64)
    comps[:, :k] = vh[:k].T
    # The sign of a principal direction is arbitrary; fix it (largest-magnitude entry positive)
    # so that repeated runs give the same colours.
    signs = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    z = xc @ comps
    lo = torch.quantile(z, 0.01, dim=0)
    hi = torch.quantile(z, 0.99, dim=0)
    return PCABasis(mean.float(), comps.float(), lo.float(), hi.float())


def pca_rgb(
    tokens: torch.Tensor, layout: TokenLayout, joint: bool = True, basis: PCABasis | None = None
) -> np.ndarray:
    """PCA-RGB maps ``(B, grid_h, grid_w, 3)`` uint8 of ``(B, T, C)`` token grids.

    ``joint=True`` fits one basis on all grids (comparable colours), ``joint=False`` one per
    grid; a given ``basis`` (e.g. fitted on the true features) is used as is.
    """
    grids = patch_grid(tokens.detach().cpu().float(), layout)
    if basis is not None:
        rgb = basis.project(grids)
    elif joint or grids.shape[0] == 1:
        rgb = fit_pca(grids).project(grids)
    else:
        rgb = torch.stack([fit_pca(g).project(g) for g in grids])
    return (rgb.numpy() * 255.0 + 0.5).astype(np.uint8)


def save_pca_panel(
    maps: np.ndarray | Sequence[np.ndarray],
    path: str | Path,
    titles: Sequence[str] | None = None,
    cell: int = 128,
    columns: int | None = None,
) -> Path:
    """Tile ``(grid_h, grid_w, 3)`` maps in rows of ``columns`` (default: one row), each
    upsampled (nearest) to ``cell`` px, with an optional title above each map."""
    maps = [np.asarray(m) for m in maps]
    if not maps:
        raise ValueError("save_pca_panel needs at least one map")
    cols = max(1, min(columns or len(maps), len(maps)))
    rows = -(-len(maps) // cols)
    title_h = 14 if titles else 0
    pad = 4
    step_x, step_y = cell + pad, cell + pad + title_h
    panel = Image.new("RGB", (cols * step_x + pad, rows * step_y + pad), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, m in enumerate(maps):
        h, w = m.shape[:2]
        scale = cell / max(h, w)
        img = Image.fromarray(m).resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST
        )
        x, y = pad + (i % cols) * step_x, pad + (i // cols) * step_y
        panel.paste(img, (x, y + title_h))
        if titles:
            draw.text((x, y), str(titles[i])[: cell // 6], fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panel.save(path)
    return path
