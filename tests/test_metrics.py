"""Alignment / retrieval metrics against naive loop implementations."""

from __future__ import annotations

import math

import pytest
import torch

from gap3d.layout import TokenLayout
from gap3d.metrics import (
    alignment_metrics,
    pool_features,
    retrieval_recall,
    topk_neighbour_overlap,
)

LAYOUT = TokenLayout(1, 2, 4, 5, 6)


def tokens(seed: int, b: int = 3, layout: TokenLayout = LAYOUT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, layout.n_tokens, layout.channels, generator=g, dtype=torch.float64)


def naive_metrics(pred: torch.Tensor, gt: torch.Tensor, layout: TokenLayout) -> dict[str, float]:
    roles = {
        "cls": range(0, layout.n_cls),
        "register": range(layout.n_cls, layout.n_cls + layout.n_registers),
        "patch": range(layout.n_cls + layout.n_registers, layout.n_tokens),
    }
    out = {}
    for role, idx in roles.items():
        if not idx:
            continue
        cos_img, ratio_img, sq, n = [], [], 0.0, 0
        for b in range(pred.shape[0]):
            cs, rs = [], []
            for i in idx:
                p, g = pred[b, i].tolist(), gt[b, i].tolist()
                dot = sum(x * y for x, y in zip(p, g, strict=True))
                npn, ngn = math.sqrt(sum(x * x for x in p)), math.sqrt(sum(y * y for y in g))
                cs.append(dot / (npn * ngn))
                rs.append(npn / ngn)
                sq += sum((x - y) ** 2 for x, y in zip(p, g, strict=True))
                n += len(p)
            cos_img.append(sum(cs) / len(cs))
            ratio_img.append(sum(rs) / len(rs))
        out[f"{role}/cosine"] = sum(cos_img) / len(cos_img)
        out[f"{role}/mse"] = sq / n
        out[f"{role}/norm_ratio"] = sum(ratio_img) / len(ratio_img)
    patch = list(roles["patch"])
    k = min(10, len(patch) - 1)
    overlaps = []
    for b in range(pred.shape[0]):

        def neighbours(x: torch.Tensor, i: int) -> set[int]:
            sims = []
            for j in patch:
                if j != i:
                    sims.append(
                        (torch.nn.functional.cosine_similarity(x[i], x[j], dim=0).item(), j)
                    )
            return {j for _, j in sorted(sims, reverse=True)[:k]}

        per = [len(neighbours(pred[b], i) & neighbours(gt[b], i)) / k for i in patch]
        overlaps.append(sum(per) / len(per))
    out["patch/top10_overlap"] = sum(overlaps) / len(overlaps)
    return out


@pytest.mark.parametrize("layout", [LAYOUT, TokenLayout(1, 0, 3, 4, 5)], ids=str)
def test_alignment_metrics_match_naive(layout: TokenLayout) -> None:
    gt = tokens(0, layout=layout)
    pred = 0.7 * gt + 0.5 * tokens(1, layout=layout)  # correlated, so overlaps are non-trivial
    got = alignment_metrics(pred, gt, layout)
    want = naive_metrics(pred, gt, layout)
    assert set(got) == set(want)
    if layout.n_registers == 0:
        assert not any(k.startswith("register/") for k in got)  # empty roles are omitted
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    assert 0 < got["patch/top10_overlap"] < 1


def test_overlap_chunking_and_small_grids() -> None:
    gt, pred = tokens(4, b=5), tokens(5, b=5)
    torch.testing.assert_close(
        topk_neighbour_overlap(pred, gt, chunk=2), topk_neighbour_overlap(pred, gt, chunk=8)
    )
    # k is capped at P - 1: with 3 patches every other patch is a neighbour -> overlap 1.
    assert torch.equal(topk_neighbour_overlap(pred[:, :3], gt[:, :3]), torch.ones(5))


def test_perfect_prediction() -> None:
    gt = tokens(2)
    m = alignment_metrics(gt.clone(), gt, LAYOUT)
    for role in ("patch", "cls", "register"):
        assert m[f"{role}/cosine"] == pytest.approx(1.0)
        assert m[f"{role}/norm_ratio"] == pytest.approx(1.0)
        assert m[f"{role}/mse"] == 0.0
    assert m["patch/top10_overlap"] == 1.0
    with pytest.raises(ValueError, match="must both be"):
        alignment_metrics(gt[:, 1:], gt[:, 1:], LAYOUT)


def test_pool_features() -> None:
    x = tokens(3)
    pooled = pool_features(x, LAYOUT, "pooled")
    cls = pool_features(x, LAYOUT, "cls")
    for b in range(x.shape[0]):
        mean = sum(x[b, i] for i in range(3, LAYOUT.n_tokens)) / LAYOUT.n_patches
        torch.testing.assert_close(pooled[b], (mean / mean.norm()).float())
        torch.testing.assert_close(cls[b], (x[b, 0] / x[b, 0].norm()).float())
    with pytest.raises(ValueError, match="no CLS"):
        pool_features(
            tokens(0, layout=TokenLayout(0, 0, 2, 2, 6)), TokenLayout(0, 0, 2, 2, 6), "cls"
        )


def test_retrieval_recall_matches_naive() -> None:
    g = torch.Generator().manual_seed(0)
    db = torch.randn(40, 8, generator=g)
    targets = torch.randint(0, 40, (25,), generator=g)
    queries = db[targets] + 0.9 * torch.randn(25, 8, generator=g)
    got = retrieval_recall(queries, db, targets, ks=(1, 5, 10))
    for k in (1, 5, 10):
        hits = 0
        for q in range(25):
            sims = [
                torch.nn.functional.cosine_similarity(queries[q], db[j], dim=0).item()
                for j in range(40)
            ]
            order = sorted(range(40), key=lambda j: -sims[j])
            hits += int(targets[q].item() in order[:k])
        assert got[f"recall@{k}"] == pytest.approx(hits / 25), k
    assert got["recall@1"] <= got["recall@5"] <= got["recall@10"]
    assert retrieval_recall(db, db, torch.arange(40))["recall@1"] == 1.0
    with pytest.raises(ValueError, match="index the database"):
        retrieval_recall(queries, db, targets + 40)
