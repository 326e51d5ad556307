"""Write the evaluation as ``metrics.json``, a markdown table and plots; print a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gap3d.inference.pca import fit_pca, patch_grid, pca_rgb, save_pca_panel
from gap3d.layout import TokenLayout

__all__ = ["write_report", "markdown", "print_summary"]

METHOD_NAMES = {
    "ours": "GAP3D aligner (ours)",
    "regressor": "regressor baseline",
    "mean": "mean-feature baseline",
    "true_features": "true features (own render is in the library)",
}
GROUP_NAMES = {
    "all": "all evaluated",
    "val": "validation (seen combinations)",
    "heldout": "held-out combinations",
}


def _better(metric: str, values: dict[str, float]) -> str | None:
    """Which method is best on ``metric`` (higher is better except MSE; norm ratio -> 1)."""
    if not values:
        return None
    if metric.endswith("/mse"):
        return min(values, key=values.get)
    if metric.endswith("/norm_ratio"):
        return min(values, key=lambda m: abs(values[m] - 1.0))
    return max(values, key=values.get)


def markdown(result: dict[str, Any]) -> str:
    """Tables: ours vs baselines for every metric and group, then the demo accuracy."""
    methods = list(result["methods"])
    lines = [
        f"# gap3d eval — {result.get('config', '')}",
        "",
        f"{result['n_eval']['val']} validation + {result['n_eval']['heldout']} held-out "
        f"samples; {result['settings']['steps']} Euler steps, CFG "
        f"{result['settings']['cfg_scale']}. Best value in bold (MSE: lowest, norm ratio: "
        "closest to 1, others: highest).",
        "",
    ]
    groups = [g for g in GROUP_NAMES if any(g in result["methods"][m] for m in methods)]
    for g in groups:
        keys = list(result["methods"][methods[0]].get(g, {}))
        lines += [
            f"## {GROUP_NAMES[g]}",
            "",
            "| metric | " + " | ".join(METHOD_NAMES.get(m, m) for m in methods) + " |",
            "|---|" + "---:|" * len(methods),
        ]
        for k in keys:
            vals = {
                m: result["methods"][m][g][k]
                for m in methods
                if k in result["methods"][m].get(g, {})
            }
            best = _better(k, vals)
            top = f"{vals[best]:.4f}" if best else None
            cells = [
                (f"**{vals[m]:.4f}**" if f"{vals[m]:.4f}" == top else f"{vals[m]:.4f}")
                if m in vals
                else "–"
                for m in methods
            ]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    demo = result.get("demo_accuracy") or {}
    lines += ["## demo: top-1 retrieval of an asset with the prompt's shape and colour", ""]
    if "skipped" in demo:
        lines += [f"skipped: {demo['skipped']}", ""]
    elif demo:
        dm = [m for m in ("ours", "regressor", "mean", "true_features") if m in demo]
        gs = [g for g in ("val", "heldout", "all") if g in demo[dm[0]]]
        lines += [
            f"retrieval score `{demo.get('score')}` over {demo.get('library_size')} assets; "
            "cells: shape+colour (shape / colour).",
            "",
            "| method | " + " | ".join(GROUP_NAMES[g] for g in gs) + " |",
            "|---|" + "---:|" * len(gs),
        ]
        for m in dm:
            cells = [
                f"{demo[m][g]['shape_colour']:.3f} ({demo[m][g]['shape']:.2f} / "
                f"{demo[m][g]['colour']:.2f})"
                for g in gs
            ]
            lines.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += novel_markdown(result.get("novel_words") or {})
    return "\n".join(lines)


NOVEL_KINDS = {
    "colour": "new colour word",
    "shape": "new shape word",
    "both": "both new",
    "all": "all new-word prompts",
}


def novel_markdown(novel: dict[str, Any]) -> list[str]:
    """The new-word section: top-1 shape+colour per method, kind and seen/held-out combo."""
    lines = ["## new words: prompts whose colour/shape words no training caption uses", ""]
    if not novel:
        return []
    if "skipped" in novel:
        return [*lines, f"skipped: {novel['skipped']}", ""]
    methods = [m for m in ("ours", "regressor", "mean", "encoder_nearest") if m in novel["methods"]]
    names = {
        **METHOD_NAMES,
        "encoder_nearest": "frozen encoder alone (nearest in-vocabulary prompt)",
    }
    kinds = [k for k in NOVEL_KINDS if k in novel["methods"]["ours"]]
    eu = novel.get("encoder_understood", {})
    lines += [
        f"{novel['n_prompts']} prompts ({novel['per_kind']} per combination and kind), encoded "
        "live; cells: top-1 shape+colour on **seen / held-out** combinations. The frozen "
        f"encoder alone places {eu.get('n', 0)} of them ({eu.get('share', 0.0):.0%}) nearest "
        "the right in-vocabulary prompt.",
        "",
        "| method | " + " | ".join(NOVEL_KINDS[k] for k in kinds) + " |",
        "|---|" + "---:|" * len(kinds),
    ]

    def cell(table: dict[str, Any], k: str) -> str:
        row = table.get(k, {})
        return " / ".join(
            f"{row[g]['shape_colour']:.3f}" if g in row else "–" for g in ("seen", "heldout")
        )

    for m in methods:
        t = novel["methods"][m]
        lines.append(f"| {names.get(m, m)} | " + " | ".join(cell(t, k) for k in kinds) + " |")
    under = novel.get("methods_encoder_understood") or {}
    if "ours" in under:
        lines.append(
            "| ours, prompts the encoder places right | "
            + " | ".join(cell(under["ours"], k) for k in kinds)
            + " |"
        )
    words = novel.get("words", {})
    lines += [
        "",
        "New words: colours "
        + "; ".join(f"{c}: {', '.join(ws)}" for c, ws in words.get("colour_words", {}).items())
        + "; shapes "
        + "; ".join(f"{s}: {', '.join(ws)}" for s, ws in words.get("shape_words", {}).items())
        + ".",
        "",
    ]
    return lines


def _bar(ax: Any, labels: list[str], series: dict[str, list[float]], title: str) -> None:
    x = np.arange(len(labels))
    w = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=METHOD_NAMES.get(name, name))
    ax.set_xticks(x, labels)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def _plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    first = next(iter(methods.values()))["all"]
    roles = [r for r in ("patch", "cls", "register") if f"{r}/cosine" in first]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    _bar(
        axes[0],
        roles,
        {m: [methods[m]["all"][f"{r}/cosine"] for r in roles] for m in methods},
        "per-token cosine by role",
    )
    rk = [k for k in first if k.startswith("retrieval/")]
    _bar(
        axes[1],
        [k.removeprefix("retrieval/") for k in rk],
        {m: [methods[m]["all"][k] for k in rk] for m in methods},
        "text->image retrieval",
    )
    axes[1].tick_params(axis="x", labelrotation=30)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "metrics.png", dpi=110)
    plt.close(fig)
    files = ["metrics.png"]
    demo = result.get("demo_accuracy") or {}
    dm = [m for m in ("ours", "regressor", "mean", "true_features") if m in demo]
    if dm:
        gs = [g for g in ("val", "heldout") if g in demo[dm[0]]]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        _bar(
            ax,
            [GROUP_NAMES[g] for g in gs],
            {m: [demo[m][g]["shape_colour"] for g in gs] for m in dm},
            "demo top-1 shape+colour",
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "demo_accuracy.png", dpi=110)
        plt.close(fig)
        files.append("demo_accuracy.png")
    return files


def _pca_examples(
    preds: dict[str, torch.Tensor], gt: torch.Tensor, layout: TokenLayout, out_dir: Path, n: int = 4
) -> str:
    """True vs. predicted PCA maps of the first ``n`` samples, one basis fitted on the truth."""
    n = min(n, gt.shape[0])
    basis = fit_pca(patch_grid(gt[:n], layout))
    maps, titles = [], []
    for i in range(n):
        maps.append(pca_rgb(gt[i : i + 1], layout, basis=basis)[0])
        titles.append(f"#{i} true")
        for m, p in preds.items():
            maps.append(pca_rgb(p[i : i + 1], layout, basis=basis)[0])
            titles.append(f"#{i} {m}")
    save_pca_panel(maps, out_dir / "pca_examples.png", titles, cell=96, columns=1 + len(preds))
    return "pca_examples.png"


def write_report(
    result: dict[str, Any],
    out_dir: str | Path,
    preds: dict[str, torch.Tensor] | None = None,
    gt: torch.Tensor | None = None,
    layout: TokenLayout | None = None,
) -> list[str]:
    """``metrics.json`` + ``metrics.md`` + plots in ``out_dir``; returns the file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ["metrics.json", "metrics.md"] + _plots(result, out_dir)
    if preds is not None and gt is not None and layout is not None and layout.n_patches >= 2:
        files.append(_pca_examples(preds, gt, layout, out_dir))
    result["files"] = files
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "metrics.md").write_text(markdown(result))
    return files


def print_summary(result: dict[str, Any]) -> None:
    """A few headline numbers per method on one screen."""
    keys = ["patch/cosine", "cls/cosine", "patch/top10_overlap", "retrieval/pooled/recall@1"]
    print(f"{'method':<24}" + "".join(f"{k:>28}" for k in keys))
    for m, groups in result["methods"].items():
        row = groups.get("all", {})
        print(
            f"{METHOD_NAMES.get(m, m):<24}"
            + "".join(f"{row[k]:>28.4f}" if k in row else f"{'–':>28}" for k in keys)
        )
    demo = result.get("demo_accuracy") or {}
    if "skipped" not in demo:
        for m in ("ours", "regressor", "mean", "true_features"):
            if m in demo:
                accs = ", ".join(f"{g} {v['shape_colour']:.3f}" for g, v in demo[m].items())
                print(f"demo shape+colour top-1 [{m}]: {accs}")
    novel = result.get("novel_words") or {}
    if novel and "skipped" not in novel:
        for m in ("ours", "regressor", "encoder_nearest"):
            row = novel["methods"].get(m, {}).get("all", {})
            if row:
                accs = ", ".join(f"{g} {v['shape_colour']:.3f}" for g, v in row.items())
                print(f"new-word prompts, shape+colour top-1 [{m}]: {accs}")
    print(f"wrote {', '.join(result.get('files', []))}")
