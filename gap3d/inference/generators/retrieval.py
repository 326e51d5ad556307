"""``retrieval`` generator (CPU, demo default): the library asset whose renders look most like
the generated tokens, judged in the image encoder's own feature space.

Every render of every asset is encoded once (``library_index.py``). A generated token grid is
compared with each render by four scores, and an asset scores as its best view:

* ``cls``      cosine of the CLS token (the pooled token for EfficientNet; falls back to
               ``pooled`` for layouts without a CLS token);
* ``pooled``   cosine of the mean patch token;
* ``patch``    mean over grid positions of the per-patch cosine (spatially aligned);
* ``combined`` the mean of the three.

Tokens are centred by the library's per-role mean before the cosines: raw CNN/ViT features
share a large common direction that would otherwise push every cosine towards 1 and flatten
the ranking.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gap3d.config import Gap3dConfig
from gap3d.inference.generators.base import Generator, check_tokens, layout_from_manifest
from gap3d.inference.library_index import LibraryIndex, build_library_index
from gap3d.layout import TokenLayout

SCORE_KINDS = ("cls", "pooled", "patch", "combined")

__all__ = ["SCORE_KINDS", "RetrievalGenerator", "view_scores", "asset_scores", "build"]


def _centres(library_tokens: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
    centres = {"patch": library_tokens[:, layout.patch_slice].mean((0, 1))}
    if layout.n_cls:
        centres["cls"] = library_tokens[:, layout.cls_slice].mean((0, 1))
    return centres


def view_scores(
    query: torch.Tensor,
    views: torch.Tensor,
    layout: TokenLayout,
    centres: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Scores ``(B, V)`` of each query grid against each view grid, for every score kind."""
    centres = centres if centres is not None else _centres(views, layout)
    q, v = query.float(), views.float()
    qp = q[:, layout.patch_slice] - centres["patch"]
    vp = v[:, layout.patch_slice] - centres["patch"]
    out: dict[str, torch.Tensor] = {}
    out["pooled"] = F.normalize(qp.mean(1), dim=-1) @ F.normalize(vp.mean(1), dim=-1).T
    # sum_p <q_p, v_p> / P over unit patches == per-patch cosine averaged over the grid;
    # flattening (P, C) turns it into one matmul.
    qn = F.normalize(qp, dim=-1).flatten(1)
    vn = F.normalize(vp, dim=-1).flatten(1)
    out["patch"] = (qn @ vn.T) / layout.n_patches
    if layout.n_cls:
        qc = q[:, layout.cls_slice].mean(1) - centres["cls"]
        vc = v[:, layout.cls_slice].mean(1) - centres["cls"]
        out["cls"] = F.normalize(qc, dim=-1) @ F.normalize(vc, dim=-1).T
    else:
        out["cls"] = out["pooled"]
    out["combined"] = (out["cls"] + out["pooled"] + out["patch"]) / 3.0
    return out


def asset_scores(scores: torch.Tensor, view_asset: torch.Tensor, n_assets: int) -> torch.Tensor:
    """``(B, V)`` view scores -> ``(B, A)`` asset scores (best view of each asset)."""
    out = torch.full((scores.shape[0], n_assets), float("-inf"), dtype=scores.dtype)
    idx = view_asset.unsqueeze(0).expand_as(scores)
    return out.scatter_reduce(1, idx, scores, reduce="amax")


class RetrievalGenerator(Generator):
    """Nearest library asset by token similarity; copies its GLB and renders as the result."""

    name = "retrieval"

    def __init__(self, index: LibraryIndex, score: str = "combined", top_k: int = 5) -> None:
        super().__init__(index.layout)
        if score not in SCORE_KINDS:
            raise ValueError(f"generator.score must be one of {SCORE_KINDS}, got {score!r}")
        self.index = index
        self.score = score
        self.top_k = max(1, min(top_k, len(index.assets)))
        self._centres = _centres(index.tokens, index.layout)

    def rank(self, tokens: torch.Tensor, batch: int = 64) -> dict[str, torch.Tensor]:
        """Asset scores ``(B, A)`` of every kind for ``(B, T, C)`` tokens."""
        check_tokens(tokens, self.layout, "retrieval generator")
        n = len(self.index.assets)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in SCORE_KINDS}
        for i in range(0, tokens.shape[0], batch):
            vs = view_scores(
                tokens[i : i + batch].cpu(), self.index.tokens, self.layout, self._centres
            )
            for k in SCORE_KINDS:
                parts[k].append(asset_scores(vs[k], self.index.view_asset, n))
        return {k: torch.cat(v) for k, v in parts.items()}

    def _entry(self, scores: dict[str, torch.Tensor], b: int, a: int, rank: int) -> dict[str, Any]:
        asset = self.index.assets[a]
        return {
            "rank": rank,
            "asset_id": asset.asset_id,
            # flattened for quick reading (gap3d demo prints shape and colour)
            **{k: asset.meta[k] for k in ("shape", "colour", "split") if k in asset.meta},
            "score": float(scores[self.score][b, a]),
            "scores": {k: float(scores[k][b, a]) for k in SCORE_KINDS},
            "meta": asset.meta,
        }

    def generate(self, tokens: torch.Tensor, out_dir: Path, prompt: str) -> dict[str, Any]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        scores = self.rank(tokens)
        main = scores[self.score]
        top = main.topk(self.top_k, dim=1).indices
        samples = [
            {"top_k": [self._entry(scores, b, int(a), r + 1) for r, a in enumerate(top[b])]}
            for b in range(main.shape[0])
        ]
        # The result is the single best (sample, asset) pair over all samples.
        b_best = int(main.gather(1, top[:, :1]).squeeze(1).argmax())
        best = dict(samples[b_best]["top_k"][0], sample=b_best)
        asset = self.index.assets[int(top[b_best, 0])]
        files: list[str] = []
        if asset.glb is not None and asset.glb.exists():
            shutil.copyfile(asset.glb, out_dir / "asset.glb")
            files.append("asset.glb")
            best["glb"] = "asset.glb"
        best["source_glb"] = str(asset.glb) if asset.glb else None
        previews = []
        for v, render in enumerate(asset.renders):
            name = f"preview_{v}{render.suffix or '.png'}"
            shutil.copyfile(render, out_dir / name)
            previews.append(name)
        best["previews"] = previews
        files += previews
        return {
            "score_kind": self.score,
            "library_size": len(self.index.assets),
            "index_key": self.index.key,
            "best": best,
            "samples": samples,
            "files": files,
        }


def build(cfg: Gap3dConfig, manifest: dict[str, Any]) -> RetrievalGenerator:
    index = build_library_index(cfg, manifest)
    layout = layout_from_manifest(manifest)
    if index.layout != layout:
        raise ValueError(f"library index layout {index.layout} != store layout {layout}")
    return RetrievalGenerator(index, score=cfg.generator.score, top_k=cfg.generator.top_k)
