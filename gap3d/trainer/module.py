"""The LightningModule: flow-matching aligner training on cached features.

Everything the network needs to know about the data (token layout, prompt dim and length,
normalisation statistics) comes from the feature store manifest, never from constants. The
module's hyper-parameters are plain data (the config dict, the store facts, a config hash), so a
checkpoint loads with ``torch.load(..., weights_only=True)``.

Exact resume: the t / noise / CFG-dropout draws of step ``k`` on rank ``r`` come from a
generator seeded with ``(seed, k, r)`` (:func:`step_seed`), the batch of step ``k`` is a pure
function of ``(seed, k)`` (``data.StepBatchSampler``) and the EMA is part of the checkpoint, so
stopping at step ``k`` and resuming replays exactly the same steps.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from gap3d.config import config_from_dict
from gap3d.layout import TokenLayout
from gap3d.metrics import alignment_metrics
from gap3d.trainer.ema import EMA
from gap3d.trainer.flow import FlowMatching
from gap3d.trainer.model import AlignerNet, resolve_aligner_size
from gap3d.trainer.normalize import TokenNormalizer
from gap3d.trainer.speed import make_adamw

# Config sections whose change makes a checkpoint a different experiment (resume refuses).
# max_steps may grow (longer run), and run-time knobs (workers, devices, logging) may change.
RESUME_KEYS = (
    "seed",
    "aligner",
    "train.batch_size",
    "train.lr",
    "train.weight_decay",
    "train.warmup_steps",
    "train.grad_clip",
    "train.ema_decay",
    "train.cfg_dropout",
    "train.t_sampling",
    "train.loss_weights",
    "train.val_samples",
)


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


# Keys inside RESUME_KEYS sections that change how, not what, is computed (may change on resume).
RUNTIME_KEYS = ("aligner.grad_checkpointing",)


def resume_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The values of :data:`RESUME_KEYS` in a config dict (compared on resume)."""
    out = {k: _get(config, k) for k in RESUME_KEYS}
    for key in RUNTIME_KEYS:
        section, _, leaf = key.rpartition(".")
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != leaf}
    return out


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for the randomness of one training step on one rank."""
    return int(
        np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint32).view(np.uint64)[0]
        >> np.uint64(1)
    )


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor: linear warmup to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def placeholder_stats(layout: TokenLayout) -> dict[str, np.ndarray]:
    """Stats of the right shapes, overwritten when a checkpoint's state dict is loaded."""
    out: dict[str, np.ndarray] = {}
    for role, n in (
        ("cls", layout.n_cls),
        ("register", layout.n_registers),
        ("patch", layout.n_patches),
    ):
        if n:
            out[f"{role}_mean"] = np.zeros(layout.channels, np.float32)
            out[f"{role}_std"] = np.ones(layout.channels, np.float32)
    return out


class AlignerModule(pl.LightningModule):
    """Aligner net + flow objective + normaliser + EMA, configured from plain data.

    Args:
        config: ``Gap3dConfig.to_dict()``.
        store_info: ``layout`` (dict), ``prompt_dim``, ``prompt_max_length``, ``manifest``
            (the store's manifest, exported with the weights) and ``store_path``.
        config_hash: hash of the config sections that define the experiment.
        stats: the store's per-role statistics (tensors are kept out of ``hparams``); ``None``
            builds placeholders to be overwritten by a checkpoint.
    """

    def __init__(
        self,
        config: dict[str, Any],
        store_info: dict[str, Any],
        config_hash: str = "",
        stats: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["stats"])
        self.cfg = config_from_dict(config, source="<checkpoint hparams>")
        self.layout = TokenLayout.from_dict(store_info["layout"])
        self.prompt_dim = int(store_info["prompt_dim"])
        net = AlignerNet(self.layout, self.prompt_dim, self.cfg.aligner)
        tc = self.cfg.train
        self.flow = FlowMatching(net, self.layout, tc.loss_weights, tc.t_sampling, tc.cfg_dropout)
        if self.cfg.aligner.normalize_targets:
            self.normalizer = TokenNormalizer(
                self.layout,
                stats or placeholder_stats(self.layout),
                self.cfg.aligner.normalize_scale,
            )
        else:
            self.normalizer = TokenNormalizer(self.layout, None)
        # Warm-up (decay min(d, (1+n)/(10+n))) so early validation and short runs do not
        # sample from an EMA still dominated by the zero-initialised head.
        self.ema = EMA(net, tc.ema_decay, warmup=True)
        # Mean-feature baseline (per position, store space), set by the trainer from the store.
        self.register_buffer("mean_tokens", torch.zeros(self.layout.n_tokens, self.layout.channels))
        self._compiled_net: Any = None  # train.compile: set in on_fit_start

    @property
    def net(self) -> AlignerNet:
        return self.flow.net  # type: ignore[return-value]

    def aligner_sizes(self) -> dict[str, Any]:
        a = self.cfg.aligner
        return {
            **resolve_aligner_size(a),
            "n_queries": a.n_queries,
            "resampler_depth": a.resampler_depth,
            "normalize_targets": a.normalize_targets,
            "prediction": a.prediction,
        }

    # ------------------------------------------------------------------------------ training

    def _step_generator(self) -> torch.Generator:
        seed = step_seed(self.cfg.seed, self.global_step, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x0 = self.normalizer.normalize(batch["image_tokens"].float())
        loss, parts = self.flow.loss(
            x0,
            batch["prompt_latents"].float(),
            batch["prompt_mask"].bool(),
            generator=self._step_generator(),
            net=self._compiled_net,
        )
        bs = x0.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=bs)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=bs)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: Lightning runs callback hooks (ModelCheckpoint's
        # step checkpoint) before the module's on_train_batch_end, which would save an EMA one
        # update behind the weights and break exact resume.
        self.ema.update(self.net)

    def configure_optimizers(self) -> dict[str, Any]:
        tc = self.cfg.train
        opt = make_adamw(self.net.parameters(), tc.lr, tc.weight_decay)  # fused where supported
        warmup, total = tc.warmup_steps, tc.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, warmup, total)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------------------- validation

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, float]:
        """Sample with the EMA weights and compare with the true tokens in store space."""
        gt = batch["image_tokens"].float()
        cond, mask = batch["prompt_latents"].float(), batch["prompt_mask"].bool()
        ev = self.cfg.eval
        # Fixed noise per val batch, so metrics at different steps compare like for like.
        gen = torch.Generator(device=self.device).manual_seed(
            step_seed(self.cfg.seed + 1, batch_idx, self.global_rank)
        )
        # The EMA weights were swapped in once for the whole run (on_validation_epoch_start).
        x0 = self.normalizer.normalize(gt)
        val_loss, _ = self.flow.loss(x0, cond, mask, generator=gen)
        pred = self.flow.sample(cond, mask, steps=ev.steps, cfg_scale=ev.cfg_scale, generator=gen)
        pred = self.normalizer.denormalize(pred)
        bs = gt.shape[0]
        metrics = alignment_metrics(pred, gt, self.layout)
        base = alignment_metrics(self.mean_tokens.expand_as(gt), gt, self.layout)
        self.log("val/loss", val_loss, batch_size=bs, sync_dist=True)
        for k, v in metrics.items():
            self.log(
                f"val/{k}", float(v), batch_size=bs, sync_dist=True, prog_bar=k == "patch/cosine"
            )
        for k, v in base.items():
            self.log(f"val_baseline/{k}", float(v), batch_size=bs, sync_dist=True)
        return metrics

    def on_validation_epoch_start(self) -> None:
        # One swap per validation run: swapping per batch cloned every parameter each time.
        self.ema.swap_in(self.net)

    def on_validation_epoch_end(self) -> None:
        self.ema.swap_out(self.net)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # A validation run that raised never reached on_validation_epoch_end: never train on
        # (or checkpoint) the EMA weights by mistake.
        self.ema.swap_out(self.net)

    # ---------------------------------------------------------------------------- checkpoint

    def on_fit_start(self) -> None:
        self.ema.to(self.device)
        if self.cfg.train.compile and self._compiled_net is None:
            # A wrapper around the same parameters, kept out of the module tree (state dict,
            # EMA and export see the plain net); only the training loss runs through it.
            object.__setattr__(self, "_compiled_net", torch.compile(self.net, dynamic=False))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema.is_swapped:
            raise RuntimeError("checkpoint requested while the EMA weights are swapped in")
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ema" not in checkpoint:
            raise ValueError("checkpoint has no EMA state; it was not written by gap3d train")
        self.ema.load_state_dict(checkpoint["ema"])
