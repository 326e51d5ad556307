"""Alignment and retrieval metrics with the GAP3D paper's definitions (docs/METHOD.md, "Evaluation").

Used by validation during training, ``gap3d eval`` and the notebooks. All functions take
``(B, T, C)`` token tensors in the *store's* space (de-normalised) and are vectorised.

* per-token cosine: cosine of each predicted token with its true token, averaged over the
  tokens of a role, then over images;
* MSE: element-wise, over all tokens and channels of a role;
* norm ratio: ``||pred_i|| / ||gt_i||`` per token, averaged like the cosine;
* top-10 neighbour overlap (patches): for each patch, the sets of its 10 most similar other
  patches (cosine) in the predicted and in the true grid; overlap = |intersection| / 10,
  averaged over patches, then images. It measures whether the *structure* of the grid is right
  even where individual tokens are off.
* text->image retrieval: database = true images' pooled (mean of patches) or CLS features,
  L2-normalised; queries = the same pooling of generated tokens; Recall@K.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from gap3d.layout import TokenLayout

NEIGHBOURS = 10  # paper: top-10 neighbour overlap
_EPS = 1e-8


def _roles(layout: TokenLayout) -> dict[str, slice]:
    roles = {
        "patch": layout.patch_slice,
        "cls": layout.cls_slice,
        "register": layout.register_slice,
    }
    return {k: s for k, s in roles.items() if s.stop > s.start}


def _check_pair(pred: Tensor, gt: Tensor, layout: TokenLayout) -> None:
    want = (layout.n_tokens, layout.channels)
    if pred.shape != gt.shape or pred.ndim != 3 or tuple(pred.shape[1:]) != want:
        raise ValueError(
            f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must both be (B, {want[0]}, "
            f"{want[1]}) for layout {layout}"
        )


def topk_neighbour_overlap(pred: Tensor, gt: Tensor, k: int = NEIGHBOURS, chunk: int = 8) -> Tensor:
    """Per-image overlap ``(B,)`` of the k-nearest-neighbour sets of ``(B, P, C)`` tokens.

    Neighbours by cosine similarity, excluding the token itself; ``k`` is capped at ``P - 1``.
    """
    p = pred.shape[1]
    k = min(k, p - 1)
    if k < 1:
        raise ValueError(f"neighbour overlap needs at least 2 tokens, got {p}")

    def knn(x: Tensor) -> Tensor:
        x = F.normalize(x.float(), dim=-1, eps=_EPS)
        sim = x @ x.transpose(1, 2)
        sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # a token is not its own neighbour
        return sim.topk(k, dim=-1).indices  # (b, P, k)

    out = []
    # A few images at a time: the (b, P, P) similarity of 1369 DINOv2 patches is 7.5 MB each.
    for start in range(0, pred.shape[0], chunk):
        pk = knn(pred[start : start + chunk])
        gk = knn(gt[start : start + chunk])
        # |intersection| of two k-sets of distinct indices, via a (b, P, k, k) equality table.
        shared = (pk[..., :, None] == gk[..., None, :]).any(-1).sum(-1)
        out.append(shared.float().mean(dim=1) / k)
    return torch.cat(out)


@torch.no_grad()
def alignment_metrics(pred: Tensor, gt: Tensor, layout: TokenLayout) -> dict[str, float]:
    """``{role}/{cosine,mse,norm_ratio}`` for each role with tokens, and ``patch/top10_overlap``.

    Roles: ``patch``, ``cls``, ``register``; a role with no tokens in ``layout`` is omitted.
    """
    _check_pair(pred, gt, layout)
    pred, gt = pred.float(), gt.float()
    out: dict[str, float] = {}
    for role, sl in _roles(layout).items():
        p, g = pred[:, sl], gt[:, sl]
        cos = F.cosine_similarity(p, g, dim=-1, eps=_EPS)  # (B, n)
        ratio = p.norm(dim=-1) / g.norm(dim=-1).clamp_min(_EPS)
        out[f"{role}/cosine"] = cos.mean(dim=1).mean().item()
        out[f"{role}/mse"] = (p - g).square().mean().item()
        out[f"{role}/norm_ratio"] = ratio.mean(dim=1).mean().item()
    if layout.n_patches >= 2:
        overlap = topk_neighbour_overlap(pred[:, layout.patch_slice], gt[:, layout.patch_slice])
        out[f"patch/top{NEIGHBOURS}_overlap"] = overlap.mean().item()
    return out


def pool_features(
    tokens: Tensor, layout: TokenLayout, kind: Literal["pooled", "cls"] = "pooled"
) -> Tensor:
    """``(B, T, C)`` tokens -> L2-normalised ``(B, C)``: mean of patches, or the CLS token.

    With several CLS tokens (not the case for DINOv2 or the demo) their mean is used.
    """
    if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (layout.n_tokens, layout.channels):
        raise ValueError(
            f"tokens must be (B, {layout.n_tokens}, {layout.channels}), got {tuple(tokens.shape)}"
        )
    if kind == "pooled":
        feats = tokens[:, layout.patch_slice].float().mean(dim=1)
    elif kind == "cls":
        if layout.n_cls == 0:
            raise ValueError(f"layout {layout} has no CLS token; use kind='pooled'")
        feats = tokens[:, layout.cls_slice].float().mean(dim=1)
    else:
        raise ValueError(f"kind must be 'pooled' or 'cls', got {kind!r}")
    return F.normalize(feats, dim=-1, eps=_EPS)


@torch.no_grad()
def retrieval_recall(
    queries: Tensor, database: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K of ``queries (Q, C)`` against ``database (N, C)``; ``targets (Q,)`` = true rows.

    Similarity is cosine. A query scores at K when fewer than K database rows are *strictly*
    more similar than its target (ties count in the query's favour, so the result does not
    depend on sort order). Keys: ``recall@{k}``.
    """
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"queries (Q, C) and database (N, C) must share C, got {tuple(queries.shape)} and "
            f"{tuple(database.shape)}"
        )
    targets = torch.as_tensor(targets, device=queries.device).long()
    if targets.shape != (queries.shape[0],):
        raise ValueError(f"targets must be ({queries.shape[0]},), got {tuple(targets.shape)}")
    if len(targets) and (targets.min() < 0 or targets.max() >= database.shape[0]):
        raise ValueError(f"targets must index the database rows [0, {database.shape[0]})")
    sim = (
        F.normalize(queries.float(), dim=-1, eps=_EPS)
        @ F.normalize(database.float().to(queries.device), dim=-1, eps=_EPS).T
    )
    target_sim = sim.gather(1, targets[:, None])
    rank = (sim > target_sim).sum(dim=1)  # 0 = target is the best match
    return {f"recall@{k}": (rank < k).float().mean().item() for k in ks}
