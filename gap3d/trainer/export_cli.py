"""``gap3d export``: a training checkpoint -> the EMA aligner export folder.

Any checkpoint written by ``gap3d train`` holds everything needed: the config and store facts
(layout, prompt dim/length, manifest) as plain hyper-parameters, the normaliser buffers in the
state dict and the EMA shadow weights. The checkpoint is read with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from gap3d.config import Gap3dConfig


def module_from_checkpoint(ckpt: str | Path) -> tuple[Any, dict[str, Any]]:
    """Rebuild the :class:`AlignerModule` of a checkpoint (weights + EMA); returns it and the
    raw checkpoint dict."""
    from gap3d.trainer.module import AlignerModule
    from gap3d.trainer.train import load_hparams

    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; train first or pass --ckpt PATH")
    hp = load_hparams(path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    module = AlignerModule(hp["config"], hp["store_info"], hp.get("config_hash", ""), stats=None)
    try:
        module.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path} does not fit the current aligner network (written by another gap3d "
            f"version?): {str(e).splitlines()[-1].strip()}"
        ) from e
    module.on_load_checkpoint(data)
    return module.eval(), data


def export_checkpoint(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Export the EMA aligner of ``ckpt`` to ``out_dir`` (``aligner.safetensors`` + JSON)."""
    from gap3d.trainer.train import export_ema

    module, data = module_from_checkpoint(ckpt)
    extra = {
        "step": int(data.get("global_step", 0)),
        "checkpoint": str(ckpt),
        "config_hash": module.hparams.get("config_hash", ""),
    }
    return export_ema(module, Path(out_dir), extra)


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    """``gap3d export [--ckpt PATH] [--out DIR]``."""
    ckpt = Path(getattr(args, "ckpt", None) or cfg.run_dir / "checkpoints" / "last.ckpt")
    out = Path(getattr(args, "out", None) or cfg.export_dir)
    path = export_checkpoint(ckpt, out)
    print(f"exported the EMA aligner of {ckpt} to {path}")
    return 0
