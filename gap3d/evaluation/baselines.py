"""The two baselines the paper prints beside the generative aligner.

* **Mean-feature predictor**: the train-set mean token grid, whatever the prompt. Any method
  that does not beat it has learned nothing prompt-specific.
* **Deterministic regressor of the same size**: the very ``AlignerNet`` architecture, trained
  with plain MSE to output the (normalised) tokens directly from the conditioning: its token
  input is fixed to zeros and its time to ``t = 1``, so it is a prompt -> tokens regression
  with no noise and no sampling. The paper's argument is that such regression collapses to a
  conditional mean (blurry, low-contrast grids) while flow matching produces sharp samples.

The regressor is trained on the same train rows as the aligner, with the aligner's loss
weights per role, and cached under ``<workdir>/baselines/`` keyed by everything that
determines it (store, architecture, steps, rows, seed): it is trained once per store and
split, and every later ``gap3d eval`` reuses it (whatever ``--out`` or aligner it evaluates).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gap3d.config import AlignerConfig, Gap3dConfig
from gap3d.layout import TokenLayout
from gap3d.progress import Progress

__all__ = [
    "mean_tokens",
    "RegressorBaseline",
    "train_regressor",
    "load_or_train_regressor",
    "regressor_cache_dir",
]


def regressor_cache_dir(cfg: Gap3dConfig) -> Path:
    """Where trained regressor baselines are kept: ``<workdir>/baselines`` (per store)."""
    return cfg.work / "baselines"


@torch.no_grad()
def mean_tokens(store: Any, rows: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Mean ``(T, C)`` token grid over ``rows`` of the store (float64 accumulation)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if len(rows) == 0:
        raise ValueError("the mean-feature baseline needs at least one train sample")
    total = None
    for i in range(0, len(rows), batch):
        x = torch.as_tensor(store.read(rows[i : i + batch])["image_tokens"]).double().sum(0)
        total = x if total is None else total + x
    return (total / len(rows)).float()


class RegressorBaseline(torch.nn.Module):
    """``AlignerNet`` used as a direct regressor: ``tokens = net(0, t=1, cond)`` (+ denorm)."""

    def __init__(self, net: torch.nn.Module, normalizer: torch.nn.Module, layout: TokenLayout):
        super().__init__()
        self.net = net
        self.normalizer = normalizer
        self.layout = layout

    def forward_normalised(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = hidden.shape[0]
        x = hidden.new_zeros(b, self.layout.n_tokens, self.layout.channels)
        t = hidden.new_ones(b)
        return self.net(x, t, hidden, mask, None)

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor, mask: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """Store-space tokens ``(B, T, C)`` for cached prompt latents."""
        self.eval()
        dev = next(self.net.parameters()).device
        out = []
        for i in range(0, hidden.shape[0], batch):
            y = self.forward_normalised(hidden[i : i + batch].to(dev), mask[i : i + batch].to(dev))
            out.append(self.normalizer.denormalize(y.float()).cpu())
        return torch.cat(out)


def _loss(pred: torch.Tensor, target: torch.Tensor, layout: TokenLayout, w: dict[str, float]):
    from gap3d.trainer.flow import stream_mse

    err = (pred.float() - target.float()).square()
    return sum(w[name] * mse for name, mse in stream_mse(err, layout).items())


def train_regressor(
    cfg: Gap3dConfig,
    store: Any,
    rows: np.ndarray,
    normalizer: torch.nn.Module,
    aligner_cfg: AlignerConfig,
    steps: int,
    device: str = "cpu",
) -> RegressorBaseline:
    """Train the regressor for ``steps`` AdamW steps on ``rows`` (batches drawn with the seed)."""
    from gap3d.trainer.flow import stream_weights
    from gap3d.trainer.model import AlignerNet
    from gap3d.trainer.speed import make_adamw

    layout = store.layout
    torch.manual_seed(cfg.seed)
    net = AlignerNet(layout, store.prompt_dim, aligner_cfg).to(device)
    model = RegressorBaseline(net, normalizer.to(device), layout)
    weights = stream_weights(layout, cfg.train.loss_weights)
    opt = make_adamw(net.parameters(), cfg.train.lr, cfg.train.weight_decay)
    warmup = min(cfg.train.warmup_steps, max(1, steps // 10))

    def lr_at(step: int) -> float:  # linear warm-up then cosine, like the aligner's schedule
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng([cfg.seed, 0xBA5E])
    rows = np.asarray(rows, dtype=np.int64)
    bs = min(cfg.train.batch_size, len(rows))
    net.train()
    fields = ["image_tokens", "prompt_latents", "prompt_mask"]
    with Progress(steps, "train regressor baseline", unit="step") as bar:
        for _ in range(steps):
            idx = rng.choice(rows, size=bs, replace=False)  # rows come in key order
            batch = store.read(idx, fields=fields)
            x0 = normalizer.normalize(torch.as_tensor(batch["image_tokens"]).float().to(device))
            hidden = torch.as_tensor(batch["prompt_latents"]).float().to(device)
            mask = torch.as_tensor(batch["prompt_mask"]).bool().to(device)
            loss = _loss(model.forward_normalised(hidden, mask), x0, layout, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            bar.update(1, loss=float(loss.detach()))
    net.eval()
    return model


def _key(
    store: Any, aligner_cfg: AlignerConfig, rows: np.ndarray, steps: int, cfg: Gap3dConfig
) -> str:
    payload = {
        "store": {
            k: store.manifest.get(k)
            for k in ("layout", "prompt_encoder", "image_encoder", "config_hash", "created")
        },
        "aligner": aligner_cfg.__dict__,
        "steps": steps,
        "seed": cfg.seed,
        "train": {k: getattr(cfg.train, k) for k in ("lr", "batch_size", "grad_clip")},
        "rows": hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def load_or_train_regressor(
    cfg: Gap3dConfig,
    store: Any,
    rows: np.ndarray,
    normalizer: torch.nn.Module,
    aligner_cfg: AlignerConfig,
    steps: int,
    cache_dir: Path,
    device: str = "cpu",
) -> tuple[RegressorBaseline, dict[str, Any]]:
    """The cached regressor for these settings, or a freshly trained (and cached) one."""
    from gap3d.trainer.model import AlignerNet

    key = _key(store, aligner_cfg, rows, steps, cfg)
    path = Path(cache_dir) / f"regressor-{key}.safetensors"
    info = {"key": key, "steps": steps, "n_train": int(len(rows)), "path": str(path)}
    if path.exists():
        net = AlignerNet(store.layout, store.prompt_dim, aligner_cfg)
        net.load_state_dict(load_file(str(path)))
        info["cached"] = True
        return RegressorBaseline(net.to(device).eval(), normalizer.to(device), store.layout), info
    model = train_regressor(cfg, store, rows, normalizer, aligner_cfg, steps, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"key": key, "steps": str(steps)})
    tmp.replace(path)
    info["cached"] = False
    return model, info
