"""``gap3d eval``: the aligner against the mean-feature and regressor baselines.

Evaluation rows (never trained on):
* ``val``: the run's validation rows of the train split (a function of (seed, sample key) with
  the threshold in ``<run_dir>/split.json``; the trainer's rule when the file is missing) —
  seen (shape, colour) combinations, unseen images;
* ``heldout``: every store row with ``split == "heldout"`` — combinations never trained on.
At most ``eval.n_samples`` rows in total, split between the groups in proportion: the
first rows of each group by the (seed, key) score, i.e. a seeded random subset that is the
same for the same samples however the store laid them out.

Metrics per method and group (docs/METHOD.md, "Evaluation"): alignment metrics of
``gap3d.metrics.alignment_metrics`` (patch / CLS / registers), text->image Recall@1/5/10 with
pooled and CLS features (database = the true features of all evaluated images), and — when the
asset library exists and samples carry shape/colour metadata — the demo's top-1 accuracy of
retrieving an asset of the prompt's shape *and* colour with the retrieval generator. Its
``true_features`` row (the store's own tokens as queries) is a sanity check of the plumbing,
not a ceiling: each demo image is itself a render in the library, so it should score 1.0.
On the demo library the same accuracy is also measured for prompts with colour and shape
words that no training caption uses (``novel_eval.py``), encoded live.

The regressor baseline is trained once per (store, split, architecture, steps) and cached
under ``<workdir>/baselines/`` (``baselines.regressor_cache_dir``): every later ``gap3d
eval`` on the same store reuses it, whichever aligner or output folder it evaluates.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gap3d.config import Gap3dConfig
from gap3d.encoders.pinning import check_encoder
from gap3d.evaluation.baselines import load_or_train_regressor, mean_tokens, regressor_cache_dir
from gap3d.evaluation.novel_eval import novel_word_eval
from gap3d.evaluation.report import print_summary, write_report
from gap3d.evaluation.sampling import sample_batches
from gap3d.layout import TokenLayout
from gap3d.metrics import alignment_metrics, pool_features, retrieval_recall

__all__ = ["eval_rows", "evaluate", "cli_main"]

METHODS = ("ours", "regressor", "mean")


def heldout_by_score(store: Any, seed: int) -> np.ndarray:
    """The valid ``heldout`` rows ordered by their (seed, key) score: a seeded order that does
    not depend on where the cache stage wrote each sample (see ``split.split_rows``)."""
    from gap3d.trainer.split import by_score, scored_rows

    return by_score(*scored_rows(store.index(), "heldout", seed))


def eval_rows(cfg: Gap3dConfig, store: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(train_rows, val_rows, heldout_rows, note)`` with the trainer's split; val and
    held-out rows ordered by the (seed, key) score, so a subset is their first rows."""
    from gap3d.trainer.data import split_store

    heldout = heldout_by_score(store, cfg.seed)
    # The trainer's own split: its threshold from <run_dir>/split.json, or chosen the way the
    # trainer would choose it when there is none (nothing is written here).
    train, val, note = split_store(store, cfg, write=False)
    n = cfg.eval.n_samples
    total = len(val) + len(heldout)
    if total == 0:
        raise ValueError("no evaluation rows: the store has no validation or held-out samples")
    n_val = len(val) if total <= n else max(1 if len(val) else 0, round(n * len(val) / total))
    val = val[:n_val]
    heldout = heldout[: max(0, min(len(heldout), n - len(val)))]
    return train, val, heldout, note


def _read_all(store: Any, rows: np.ndarray, batch: int = 256) -> dict[str, Any]:
    parts: dict[str, list[Any]] = {}
    for i in range(0, len(rows), batch):
        fields = ("image_tokens", "prompt_latents", "prompt_mask", "caption", "meta", "split")
        b = store.read(rows[i : i + batch], fields=fields)
        for k in fields:
            parts.setdefault(k, []).append(b[k])
    out: dict[str, Any] = {}
    for k, v in parts.items():
        if k in ("image_tokens", "prompt_latents", "prompt_mask"):
            out[k] = torch.cat([torch.as_tensor(np.asarray(x)) for x in v])
        else:
            out[k] = [item for x in v for item in x]
    return out


def _group_metrics(
    pred: torch.Tensor, gt: torch.Tensor, layout: TokenLayout, groups: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """Alignment metrics per group, and Recall@K of the group's queries against the database
    of *all* evaluated images (so groups are ranked against the same database)."""
    kinds = ["pooled"] + (["cls"] if layout.n_cls else [])
    queries = {k: pool_features(pred, layout, k) for k in kinds}
    database = {k: pool_features(gt, layout, k) for k in kinds}
    res: dict[str, dict[str, float]] = {}
    for name, sel in groups.items():
        if len(sel) == 0:
            continue
        sel_t = torch.as_tensor(sel, dtype=torch.long)
        m = alignment_metrics(pred[sel_t], gt[sel_t], layout)
        for k in kinds:
            r = retrieval_recall(queries[k][sel_t], database[k], sel_t, ks=(1, 5, 10))
            m.update({f"retrieval/{k}/{key}": v for key, v in r.items()})
        res[name] = m
    return res


def _retrieval(cfg: Gap3dConfig, store: Any) -> Any:
    """The retrieval generator over the asset library, or ``None`` without a library."""
    if not (cfg.assets_dir / "library.json").exists():
        return None
    from gap3d.inference.generators.retrieval import build as build_retrieval

    return build_retrieval(cfg, store.manifest)


def _demo_accuracy(
    cfg: Gap3dConfig,
    gen: Any,
    preds: dict[str, torch.Tensor],
    meta: list[dict[str, Any]],
    groups: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Top-1 shape+colour accuracy of the retrieval generator, per method and group."""
    if gen is None:
        return {"skipped": f"no asset library at {cfg.assets_dir}"}
    if not all("shape" in m and "colour" in m for m in meta):
        return {"skipped": "samples carry no shape/colour metadata (not the demo data)"}
    out: dict[str, Any] = {"score": gen.score, "library_size": len(gen.index.assets)}
    want = [(m["shape"], m["colour"]) for m in meta]
    for method, tokens in preds.items():
        top1 = gen.rank(tokens)[gen.score].argmax(1)
        got = [
            (
                gen.index.assets[int(a)].meta.get("shape"),
                gen.index.assets[int(a)].meta.get("colour"),
            )
            for a in top1
        ]
        hit = np.array([g == w for g, w in zip(got, want, strict=True)])
        shape_hit = np.array([g[0] == w[0] for g, w in zip(got, want, strict=True)])
        colour_hit = np.array([g[1] == w[1] for g, w in zip(got, want, strict=True)])
        out[method] = {
            name: {
                "shape_colour": float(hit[sel].mean()),
                "shape": float(shape_hit[sel].mean()),
                "colour": float(colour_hit[sel].mean()),
                "n": int(len(sel)),
            }
            for name, sel in groups.items()
            if len(sel)
        }
    return out


def evaluate(
    cfg: Gap3dConfig,
    aligner_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str | None = None,
    allow_encoder_mismatch: bool = False,
) -> dict[str, Any]:
    """Run the evaluation; write ``metrics.json``, ``metrics.md`` and plots; return the JSON."""
    from gap3d.store import FeatureStore
    from gap3d.trainer.export import aligner_config_from_dict, load_aligner

    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir) if out_dir else cfg.eval_dir
    aligner_dir = Path(aligner_dir) if aligner_dir else cfg.export_dir
    store = FeatureStore.open(cfg.store_path)
    aligner = load_aligner(aligner_dir, device)
    layout = store.layout
    if aligner.layout != layout:
        raise ValueError(
            f"the aligner produces {aligner.layout} but the store at "
            f"{cfg.store_path} holds {layout}; evaluate on the store it was trained on"
        )
    # The store's latents and tokens stand for the live encoders here: they must come from
    # the very models (pinned weights, chat template, preprocessing) the aligner learned from.
    for role in ("prompt_encoder", "image_encoder"):
        a, b = aligner.manifest.get(role) or {}, store.manifest.get(role) or {}
        diffs = check_encoder(
            f"{role.replace('_', ' ')} of {cfg.store_path}", a, b, allow_encoder_mismatch
        )
        for d in diffs:
            print(f"warning: {role} of the store differs from the aligner's (allowed): {d}")
    train, val, heldout, note = eval_rows(cfg, store)
    rows = np.concatenate([val, heldout])
    print(f"gap3d eval: {len(val)} val + {len(heldout)} held-out samples ({note})")
    data = _read_all(store, rows)
    gt = data["image_tokens"].float()
    hidden, mask = data["prompt_latents"].float(), data["prompt_mask"].bool()
    groups = {
        "all": np.arange(len(rows)),
        "val": np.arange(len(val)),
        "heldout": np.arange(len(val), len(rows)),
    }

    timings: dict[str, float] = {}
    t = time.perf_counter()
    preds = {
        "ours": sample_batches(
            aligner, hidden, mask, cfg, device, cfg.seed, "sample eval prompts", "sample"
        )
    }
    timings["ours_sampling"] = time.perf_counter() - t

    t = time.perf_counter()
    preds["mean"] = mean_tokens(store, train).expand_as(gt).clone()
    timings["mean_baseline"] = time.perf_counter() - t

    t = time.perf_counter()
    # The regressor copies the exported aligner's architecture (its recorded, resolved sizes).
    aligner_cfg = aligner_config_from_dict(aligner.config["aligner"])
    steps = cfg.eval.regressor_steps or cfg.train.max_steps
    regressor, reg_info = load_or_train_regressor(
        cfg, store, train, aligner.normalizer, aligner_cfg, steps, regressor_cache_dir(cfg), device
    )
    preds["regressor"] = regressor.predict(hidden, mask)
    timings["regressor"] = time.perf_counter() - t

    methods = {m: _group_metrics(preds[m], gt, layout, groups) for m in METHODS}
    t = time.perf_counter()
    gen = _retrieval(cfg, store)
    demo = _demo_accuracy(cfg, gen, {**preds, "true_features": gt}, data["meta"], groups)
    timings["demo_retrieval"] = time.perf_counter() - t
    t = time.perf_counter()
    if gen is None:
        novel: dict[str, Any] = {"skipped": f"no asset library at {cfg.assets_dir}"}
    else:
        mean_grid = preds["mean"][:1]
        novel = novel_word_eval(
            cfg,
            aligner,
            {
                "regressor": regressor.predict,
                "mean": lambda h, m: mean_grid.expand(h.shape[0], -1, -1).clone(),
            },
            gen,
            store.manifest,
        )
    timings["novel_words"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    result = {
        "config": cfg.name,
        "store": str(cfg.store_path),
        "aligner": str(aligner_dir),
        "layout": layout.to_dict(),
        "settings": {
            "steps": cfg.eval.steps,
            "cfg_scale": cfg.eval.cfg_scale,
            "seed": cfg.seed,
            "n_samples": cfg.eval.n_samples,
            "regressor": reg_info,
            "split": note,
        },
        "n_eval": {"val": int(len(val)), "heldout": int(len(heldout)), "all": int(len(rows))},
        "methods": methods,
        "demo_accuracy": demo,
        "novel_words": novel,
        "timings_s": timings,
    }
    write_report(result, out_dir, preds=preds, gt=gt, layout=layout)
    return result


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    result = evaluate(
        cfg,
        getattr(args, "aligner", None),
        getattr(args, "out", None),
        allow_encoder_mismatch=bool(getattr(args, "allow_encoder_mismatch", False)),
    )
    print_summary(result)
    return 0
