"""``gap3d train``: fit the aligner on the feature store, resume exactly, export the EMA weights.

Reads cached tensors only (no VLM, no image encoder). Layout, prompt dim and normalisation
statistics come from the store; checkpoints go to ``<run_dir>/checkpoints`` (``last.ckpt`` plus
the latest periodic one), logs to ``<run_dir>/csv`` and ``<run_dir>/tb``, the EMA aligner to
``cfg.export_dir``. ``--resume last|PATH`` refuses a checkpoint of a different experiment and
names the fields that differ.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from gap3d.config import Gap3dConfig
from gap3d.trainer import speed
from gap3d.trainer.data import StoreDataModule, env_is_global_zero
from gap3d.trainer.module import AlignerModule, resume_fingerprint
from gap3d.trainer.progress import TextProgress, quiet_lightning
from gap3d.trainer.run_stats import run_statistics

CKPT_DIR = "checkpoints"
# Noise Lightning prints that says nothing about this run.
for _pattern in (
    ".*does not have many workers.*",
    ".*LeafSpec.*",
    ".*tensorboardX.*",
    ".*`isinstance.*treespec.*",
    ".*Experiment logs directory.*",
):
    warnings.filterwarnings("ignore", message=_pattern)


@rank_zero_only
def say(msg: str) -> None:
    """Print on global rank 0 only (DDP runs this code once per process)."""
    print(msg, flush=True)


def resolve_precision(precision: str, accelerator: str, check: Any = None) -> str:
    """``auto`` -> ``bf16-mixed`` on a GPU with bf16, or on a CPU whose bf16 matmuls are
    measured faster (and whose bf16 step agrees with fp32 when ``check`` is given); else
    ``32-true``. See :func:`gap3d.trainer.speed.resolve_precision`."""
    return speed.resolve_precision(precision, accelerator, check)[0]


def bf16_check(module: AlignerModule, dm: StoreDataModule, cfg: Gap3dConfig) -> Any:
    """A one-step closure ``check(bf16) -> (loss, grads)`` on a real training batch, for the
    fp32-vs-bf16 agreement test of ``train.precision=auto``."""
    rows = dm.train_rows[: cfg.train.batch_size]

    def check(bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        batch = dm.open_store().read(rows, fields=["image_tokens", "prompt_latents", "prompt_mask"])
        x0 = module.normalizer.normalize(torch.as_tensor(batch["image_tokens"]).float())
        cond = torch.as_tensor(batch["prompt_latents"]).float()
        mask = torch.as_tensor(batch["prompt_mask"]).bool()
        module.net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = module.flow.loss(x0, cond, mask, torch.Generator().manual_seed(cfg.seed))
        loss.backward()
        grads = [p.grad.detach().clone() for p in module.net.parameters() if p.grad is not None]
        module.net.zero_grad(set_to_none=True)
        return loss.detach(), grads

    return check


def experiment_hash(config: dict[str, Any]) -> str:
    """Hash of the config values a resumed run must share (see ``module.RESUME_KEYS``)."""
    blob = json.dumps(resume_fingerprint(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def store_info(store: Any, path: str | Path) -> dict[str, Any]:
    """Plain-data facts about the store that the module and its checkpoint keep."""
    return {
        "layout": store.layout.to_dict(),
        "prompt_dim": int(store.prompt_dim),
        "prompt_max_length": int(store.prompt_max_length),
        "manifest": json.loads(json.dumps(store.manifest, default=str)),
        "store_path": store.url,
    }


def resolve_resume(cfg: Gap3dConfig, resume: str | None) -> Path | None:
    """``None`` | ``"last"`` (``<run_dir>/checkpoints/last.ckpt``) | a checkpoint path."""
    if not resume:
        return None
    path = cfg.run_dir / CKPT_DIR / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        hint = (
            "no previous run there; start without --resume"
            if resume == "last"
            else "check the path"
        )
        raise FileNotFoundError(f"checkpoint to resume from not found: {path} ({hint})")
    return path


def load_hparams(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's hyper-parameters (weights-only load, memory-mapped: cheap when large)."""
    try:
        data = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{ckpt} is not a readable gap3d checkpoint: {e}") from e
    hp = data.get("hyper_parameters") if isinstance(data, dict) else None
    if not hp or "config" not in hp or "store_info" not in hp:
        raise ValueError(f"{ckpt} is not a gap3d training checkpoint (no gap3d hyper-parameters)")
    return hp


def checkpoint_mismatches(hp: dict[str, Any], cfg: Gap3dConfig, info: dict[str, Any]) -> list[str]:
    """Human-readable differences that make ``hp``'s checkpoint unusable for this run."""
    out: list[str] = []
    old, new = resume_fingerprint(hp["config"]), resume_fingerprint(cfg.to_dict())
    for key in old:
        if old[key] != new[key]:
            out.append(f"{key}: checkpoint {old[key]!r} vs config {new[key]!r}")
    for key in ("layout", "prompt_dim", "prompt_max_length"):
        a, b = hp["store_info"].get(key), info.get(key)
        if a != b:
            out.append(f"store {key}: checkpoint {a!r} vs store {b!r}")
    if not out and hp.get("config_hash") != experiment_hash(cfg.to_dict()):
        out.append(
            f"config hash: checkpoint {hp.get('config_hash')} vs {experiment_hash(cfg.to_dict())}"
        )
    return out


class _MaxStepsStop(Callback):
    """Stop after global step ``n`` (tests and `train(stop_at_step=...)`: a clean interruption)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.n:
            trainer.should_stop = True


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` at the final step of a fit.

    Lightning 2.6's ``on_train_end`` skips ``save_last`` once any ``last.ckpt`` was written, so
    a run ending between periodic checkpoints (``max_steps`` not a multiple, or stopped
    early) would leave a stale ``last.ckpt``. Saving in ``on_train_batch_end`` keeps the loop
    state identical to a periodic checkpoint, which resumes exactly.
    """

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        final = trainer.should_stop or trainer.global_step >= trainer.max_steps
        if final and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def build_trainer(
    cfg: Gap3dConfig, callbacks: list[Callback] | None = None, precision: str | None = None
) -> pl.Trainer:
    """The Lightning trainer for ``cfg.train`` (step-based validation and checkpoints).

    On a terminal Lightning shows its progress bar; when stdout is redirected the bar is off
    and :class:`TextProgress` prints plain lines (steps/s, ETA, loss) instead.
    """
    from gap3d.progress import plain_output

    quiet_lightning()
    tc, run_dir = cfg.train, cfg.run_dir
    plain = plain_output()
    extra: list[Callback] = [TextProgress()] if plain else []
    ckpt = StepCheckpoint(
        dirpath=run_dir / CKPT_DIR,
        filename="step{step:08d}",
        auto_insert_metric_name=False,
        save_last=True,
        every_n_train_steps=tc.checkpoint_every_n_steps,
        save_top_k=1,
        enable_version_counter=False,  # always last.ckpt, never last-v1.ckpt
    )
    return pl.Trainer(
        max_steps=tc.max_steps,
        max_epochs=-1,
        accelerator=tc.accelerator,
        devices=tc.devices,
        strategy=tc.strategy,
        precision=precision or resolve_precision(tc.precision, tc.accelerator),  # type: ignore[arg-type]
        gradient_clip_val=tc.grad_clip if tc.grad_clip > 0 else None,
        val_check_interval=tc.val_every_n_steps,
        check_val_every_n_epoch=None,  # validate every N steps, across epoch boundaries
        num_sanity_val_steps=0,
        log_every_n_steps=tc.log_every_n_steps,
        logger=[CSVLogger(run_dir, name="csv"), TensorBoardLogger(run_dir, name="tb")],
        callbacks=[ckpt, *extra, *(callbacks or [])],
        enable_progress_bar=not plain,
        default_root_dir=run_dir,
        use_distributed_sampler=False,  # the sampler shards batches per rank itself
        deterministic=tc.deterministic,
        enable_model_summary=False,
    )


def _final_metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if k.startswith(("val/", "val_baseline/"))
    }


def export_ema(module: AlignerModule, out_dir: Path, extra: dict[str, Any]) -> Path:
    """Write the EMA weights of ``module`` with the store manifest via ``save_export``."""
    from gap3d.trainer.export import save_export

    net = copy.deepcopy(module.net).cpu().eval()
    module.ema.copy_to(net)
    info = module.hparams["store_info"]
    return save_export(
        out_dir,
        net,
        copy.deepcopy(module.normalizer).cpu(),
        aligner_cfg=module.aligner_sizes(),
        layout=module.layout,
        prompt_dim=module.prompt_dim,
        prompt_max_length=int(info["prompt_max_length"]),
        manifest=info["manifest"],
        extra=extra,
    )


def train(
    cfg: Gap3dConfig,
    resume: str | None = None,
    stop_at_step: int | None = None,
    export: bool = True,
    callbacks: list[Callback] | None = None,
) -> dict[str, Any]:
    """Train (or resume) per ``cfg``; returns metrics, checkpoint and export paths.

    ``callbacks`` are added to the Lightning trainer (benchmarks time steps with one).
    """
    t0 = time.time()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = StoreDataModule(cfg)
    store = dm.open_store()
    info = store_info(store, cfg.store_path)
    ckpt_path = resolve_resume(cfg, resume)
    if ckpt_path is not None:
        hp = load_hparams(ckpt_path)
        problems = checkpoint_mismatches(hp, cfg, info)
        if problems:
            raise ValueError(
                f"refusing to resume from {ckpt_path}: it belongs to a different "
                "run (" + "; ".join(problems) + "). Use a new train.run_dir or the "
                "checkpoint's config"
            )
        if hp["config"]["train"]["max_steps"] != cfg.train.max_steps:
            dm.notes.append(
                f"train.max_steps changed {hp['config']['train']['max_steps']} -> "
                f"{cfg.train.max_steps}: the cosine LR schedule is stretched from here"
            )
    elif (cfg.run_dir / CKPT_DIR / "last.ckpt").exists():
        dm.notes.append(
            f"{cfg.run_dir / CKPT_DIR} holds checkpoints of an earlier run; this "
            "run starts from scratch and overwrites last.ckpt (--resume last to "
            "continue instead)"
        )
    dm.prepare_split()  # after the resume checks: a refused resume leaves split.json alone
    stats, mean_tokens = run_statistics(dm, cfg, env_is_global_zero(), say)
    module = AlignerModule(cfg.to_dict(), info, experiment_hash(cfg.to_dict()), stats=stats)
    module.mean_tokens.copy_(mean_tokens)

    callbacks = [*(callbacks or []), *([_MaxStepsStop(stop_at_step)] if stop_at_step else [])]
    if cfg.train.trace_batches:
        from gap3d.trainer.trace import BatchTrace

        callbacks.append(BatchTrace(cfg.run_dir))
    precision, why = speed.resolve_precision(
        cfg.train.precision, cfg.train.accelerator, bf16_check(module, dm, cfg)
    )
    trainer = build_trainer(cfg, callbacks, precision)
    lay = store.layout
    n_params = sum(p.numel() for p in module.net.parameters())
    say(
        f"store    {cfg.store_path}: layout {lay.n_cls} cls + {lay.n_registers} reg + "
        f"{lay.grid_h}x{lay.grid_w} patches x {lay.channels} ch; prompts "
        f"{store.prompt_max_length} x {store.prompt_dim}; committed shards "
        f"{len(store.committed_shards())}/{len(store.committed_shards()) + len(store.missing_shards())}"
    )
    say(
        f"samples  train {len(dm.train_rows)}, val {len(dm.val_rows)} "
        f"(using {len(dm.val_rows_used())}), held-out {dm.n_heldout} (never trained on)"
    )
    for note in dm.notes:
        say(f"note     {note}")
    say(
        f"model    aligner '{cfg.aligner.preset}' {module.aligner_sizes()} -> "
        f"{n_params / 1e6:.2f} M params"
    )
    say(
        f"run      precision {trainer.precision} ({why}), device "
        f"{trainer.strategy.root_device} x {trainer.world_size}, {cfg.train.max_steps} steps"
        + (", torch.compile" if cfg.train.compile else "")
        + f", run dir {cfg.run_dir}"
        + (f", resuming from {ckpt_path}" if ckpt_path else "")
    )

    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    metrics = _final_metrics(trainer)
    if trainer.global_step % cfg.train.val_every_n_steps != 0 or not metrics:
        trainer.validate(module, datamodule=dm, verbose=False)
        metrics = _final_metrics(trainer)
    ckpt_dir = cfg.run_dir / CKPT_DIR
    result: dict[str, Any] = {
        "step": trainer.global_step,
        "metrics": metrics,
        "last_ckpt": str(ckpt_dir / "last.ckpt"),
        "export_dir": None,
        "wall_s": time.time() - t0,
    }
    if export and trainer.is_global_zero and trainer.global_step >= cfg.train.max_steps:
        extra = {
            "step": trainer.global_step,
            "metrics": metrics,
            "config_hash": module.hparams["config_hash"],
            "checkpoint": result["last_ckpt"],
        }
        result["export_dir"] = str(export_ema(module, cfg.export_dir, extra))
    if trainer.is_global_zero:
        _print_summary(result)
    return result


def _print_summary(result: dict[str, Any]) -> None:
    m = result["metrics"]
    print(f"\nfinal validation at step {result['step']} (EMA weights; store space):")
    print(f"  {'metric':<22}{'aligner':>10}{'mean-feature':>14}")
    for key in sorted(k[4:] for k in m if k.startswith("val/")):
        base = m.get(f"val_baseline/{key}")
        base_s = f"{base:14.4f}" if base is not None else f"{'':>14}"
        print(f"  {key:<22}{m['val/' + key]:10.4f}{base_s}")
    if result["export_dir"]:
        print(f"exported EMA aligner to {result['export_dir']}")
    print(f"done in {result['wall_s']:.1f} s; last checkpoint {result['last_ckpt']}", flush=True)


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    """``gap3d train [--resume last|CKPT]``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # training never needs a hub
    train(cfg, resume=getattr(args, "resume", None))
    return 0
