"""``train.trace_batches``: what each rank trained on, step by step, for checking a run.

Each rank appends one JSON line per optimizer step to ``<run_dir>/trace/rank-R.jsonl``: the
global step, the store rows of its batch and a SHA-1 of its parameters after the step. That is
enough to check, after the fact, that DDP ranks read disjoint slices of each global batch, that
their replicas stayed identical, and that a resumed run replayed the same data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

TRACE_DIR = "trace"


def parameter_digest(module: Any) -> str:
    h = hashlib.sha1()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class BatchTrace(Callback):
    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / TRACE_DIR

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *a: Any
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = {
            "step": int(trainer.global_step),
            "rank": int(trainer.global_rank),
            "rows": [int(r) for r in batch["index"].tolist()],
            "params": parameter_digest(pl_module.net),
        }
        with (self.dir / f"rank-{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")


def read_trace(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """``{rank: [lines in step order]}`` (a resumed run's lines after the original ones)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for f in sorted((Path(run_dir) / TRACE_DIR).glob("rank-*.jsonl")):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        out[int(f.stem.split("-")[1])] = lines
    return out
