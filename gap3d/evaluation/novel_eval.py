"""Top-1 shape+colour retrieval for prompts with words the training captions never used.

The prompts come from :mod:`gap3d.evaluation.novel_words`; they are encoded live with the
prompt encoder the aligner was trained with (rebuilt from its export, like ``gap3d
generate``), turned into tokens by each method (the aligner sampled with the eval settings,
the regressor baseline, the mean-feature baseline) and handed to the retrieval generator.
A hit is a top-1 asset of the prompt's shape *and* colour. Results are split by prompt kind
(new colour word / new shape word / both) and by whether the (shape, colour) combination
was trained on (``seen``) or held out (``heldout``).

One more row puts the aligner in context: ``encoder_nearest`` asks the frozen prompt encoder
alone which in-vocabulary prompt ("a red cube", ...) its mean-pooled state is closest to.
Words the encoder itself maps to the wrong class are hard for any model conditioned on it,
so the accuracy on the prompts the encoder gets right (``encoder_understood``) is reported
beside the accuracy on all of them.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gap3d.config import Gap3dConfig
from gap3d.evaluation.novel_words import (
    KINDS,
    NovelPrompt,
    caption_vocabulary,
    library_captions,
    novel_prompts,
)
from gap3d.evaluation.sampling import sample_batches

__all__ = ["novel_word_eval", "hits_table"]

GROUPS = ("seen", "heldout")


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()[..., None]
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


def hits_table(
    got: list[tuple[Any, Any]], prompts: list[NovelPrompt], selector: np.ndarray | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """``{kind|"all": {group|"all": {shape_colour, shape, colour, n}}}`` from top-1 labels."""
    want = [(p.shape, p.colour) for p in prompts]
    both = np.array([g == w for g, w in zip(got, want, strict=True)])
    shape = np.array([g[0] == w[0] for g, w in zip(got, want, strict=True)])
    colour = np.array([g[1] == w[1] for g, w in zip(got, want, strict=True)])
    kind = np.array([p.kind for p in prompts])
    held = np.array([p.heldout for p in prompts])
    keep = np.ones(len(prompts), bool) if selector is None else selector
    out: dict[str, dict[str, dict[str, float]]] = {}
    for k in (*KINDS, "all"):
        row: dict[str, dict[str, float]] = {}
        for g in (*GROUPS, "all"):
            sel = keep & ((kind == k) if k != "all" else True)
            if g != "all":
                sel = sel & (held if g == "heldout" else ~held)
            if sel.any():
                row[g] = {
                    "shape_colour": float(both[sel].mean()),
                    "shape": float(shape[sel].mean()),
                    "colour": float(colour[sel].mean()),
                    "n": int(sel.sum()),
                }
        if row:
            out[k] = row
    return out


def novel_word_eval(
    cfg: Gap3dConfig,
    aligner: Any,
    predictors: dict[str, Any],
    generator: Any,
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Run the new-word evaluation; ``predictors`` maps a method name to
    ``fn(hidden, mask) -> tokens`` for the baselines (the aligner is sampled here)."""
    from gap3d.encoders import build_prompt_encoder
    from gap3d.inference.generate import prompt_encoder_config
    from gap3d.pipeline import captions

    lib_path = cfg.assets_dir / "library.json"
    if cfg.eval.novel_prompts_per_kind <= 0:
        return {"skipped": "eval.novel_prompts_per_kind is 0"}
    if not lib_path.exists():
        return {"skipped": f"no asset library at {cfg.assets_dir}"}
    library = json.loads(lib_path.read_text())
    assets = library.get("assets", [])
    if not assets or not all("shape" in a and "colour" in a for a in assets):
        return {"skipped": "the library's assets carry no shape/colour (not the demo library)"}
    combos = sorted({(a["shape"], a["colour"]) for a in assets})
    heldout = {tuple(h) for h in library.get("heldout_combos", [])}
    heldout |= {(a["shape"], a["colour"]) for a in assets if a.get("split") == "heldout"}
    used = caption_vocabulary(library_captions(library))
    prompts, words = novel_prompts(
        combos,
        heldout,
        used,
        captions.COLOUR_SYNONYMS,
        captions.SHAPE_SYNONYMS,
        per_kind=cfg.eval.novel_prompts_per_kind,
        seed=cfg.seed,
    )
    if not prompts:
        return {"skipped": "no new words for the library's shapes and colours"}

    encoder = build_prompt_encoder(prompt_encoder_config(cfg, manifest))
    batch = encoder.encode([p.text for p in prompts], pad_to_max=True)
    if batch.hidden.shape[1] != aligner.prompt_max_length:
        raise ValueError(
            f"prompt encoder returned {batch.hidden.shape[1]} positions, the aligner expects "
            f"{aligner.prompt_max_length}"
        )
    hidden, mask = batch.hidden, batch.mask

    # The frozen encoder alone: nearest in-vocabulary prompt by mean-pooled state.
    refs = [(s, c) for s, c in combos]
    ref_text = [
        f"a {(captions.COLOUR_SYNONYMS.get(c) or [c])[0]} {(captions.SHAPE_SYNONYMS.get(s) or [s])[0]}"
        for s, c in refs
    ]
    ref = encoder.encode(ref_text, pad_to_max=True)
    nearest = (_pooled(hidden, mask) @ _pooled(ref.hidden, ref.mask).T).argmax(1)
    enc_got = [refs[int(i)] for i in nearest]
    understood = np.array([g == (p.shape, p.colour) for g, p in zip(enc_got, prompts, strict=True)])

    device = aligner.device if hasattr(aligner, "device") else "cpu"
    tokens = {
        "ours": sample_batches(
            aligner, hidden, mask, cfg, device, cfg.seed + 7919, "new-word prompts", "prompt"
        )
    }
    for name, fn in predictors.items():
        tokens[name] = fn(hidden, mask)

    methods: dict[str, Any] = {}
    understood_only: dict[str, Any] = {}
    top1_ids: dict[str, list[str]] = {}
    for name, t in tokens.items():
        top1 = generator.rank(t)[generator.score].argmax(1)
        picked = [generator.index.assets[int(a)] for a in top1]
        got = [(a.meta.get("shape"), a.meta.get("colour")) for a in picked]
        methods[name] = hits_table(got, prompts)
        if understood.any():
            understood_only[name] = hits_table(got, prompts, understood)
        top1_ids[name] = [a.asset_id for a in picked]
    methods["encoder_nearest"] = hits_table(enc_got, prompts)
    return {
        "n_prompts": len(prompts),
        "per_kind": cfg.eval.novel_prompts_per_kind,
        "words": words,
        "encoder_understood": {
            "n": int(understood.sum()),
            "share": float(understood.mean()),
        },
        "methods": methods,
        "methods_encoder_understood": understood_only,
        "prompts": [
            {
                **p.to_dict(),
                "encoder_nearest": list(g),
                **{f"top1_{m}": ids[i] for m, ids in top1_ids.items()},
            }
            for i, (p, g) in enumerate(zip(prompts, enc_got, strict=True))
        ],
    }
