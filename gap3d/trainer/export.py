"""The exported aligner: ``aligner.safetensors`` + ``aligner.json``, loadable without Lightning.

Format (``format: gap3d-aligner``, ``format_version: 1``):

* ``aligner.safetensors``: the network's weights under ``net.*`` (the trainer exports the EMA
  weights) and the token normaliser's ``normalizer.mean`` / ``normalizer.std`` (empty when
  targets were not normalised).
* ``aligner.json``, written last (its presence marks a complete export): the resolved aligner
  config (sizes, ``n_queries``, ``resampler_depth``, ``normalize_targets``), the token layout,
  prompt dim / max length, the store manifest the aligner was trained on, the pinned identity
  of both encoders (``encoders``: resolved hub commits or weight hashes, from that manifest), the
  gap3d version, the SHA-256 of the weights file, and ``extra`` (e.g. training step, validation metrics).

:func:`load_aligner` rebuilds the network from the JSON alone, so inference never needs the
training code or the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from gap3d import __version__
from gap3d.config import AlignerConfig
from gap3d.encoders.pinning import encoder_pins
from gap3d.layout import TokenLayout
from gap3d.trainer.flow import FlowMatching
from gap3d.trainer.model import AlignerNet, resolve_aligner_size
from gap3d.trainer.normalize import TokenNormalizer

WEIGHTS_NAME = "aligner.safetensors"
CONFIG_NAME = "aligner.json"
FORMAT = "gap3d-aligner"
FORMAT_VERSION = 1


class ExportError(RuntimeError):
    """A missing, incomplete or corrupt aligner export; the message says what to do."""


def resolved_aligner_config(cfg: AlignerConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Sizes + ``n_queries`` / ``resampler_depth`` / ``normalize_targets`` as a plain dict."""
    if isinstance(cfg, AlignerConfig):
        return {
            "preset": cfg.preset,
            **resolve_aligner_size(cfg),
            "n_queries": cfg.n_queries,
            "resampler_depth": cfg.resampler_depth,
            "normalize_targets": cfg.normalize_targets,
            "prediction": cfg.prediction,
        }
    return dict(cfg)


def aligner_config_from_dict(d: Mapping[str, Any]) -> AlignerConfig:
    """Inverse of :func:`resolved_aligner_config` (every size explicit, so presets may change)."""
    names = {f.name for f in dataclasses.fields(AlignerConfig)}
    return AlignerConfig(**{k: v for k, v in d.items() if k in names})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.generic, Tensor)):
        return o.item() if getattr(o, "ndim", 0) == 0 else o.tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    raise TypeError(f"export metadata value of type {type(o).__name__} is not JSON-serialisable")


def save_export(
    out_dir: str | os.PathLike[str],
    net: AlignerNet,
    normalizer: TokenNormalizer,
    *,
    aligner_cfg: AlignerConfig | Mapping[str, Any],
    layout: TokenLayout,
    prompt_dim: int,
    prompt_max_length: int,
    manifest: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the export folder and return it. Pass ``net`` with the weights to ship (EMA)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acfg = resolved_aligner_config(aligner_cfg)
    for key in ("width", "depth", "heads", "mlp_ratio"):
        if key in acfg and acfg[key] != net.sizes[key]:
            raise ValueError(f"aligner_cfg {key}={acfg[key]} but the network has {net.sizes[key]}")
    acfg.update(net.sizes, n_queries=net.n_queries, resampler_depth=net.resampler_depth)
    acfg.setdefault("normalize_targets", normalizer.enabled)
    if layout != net.layout or prompt_dim != net.prompt_dim:
        raise ValueError(
            f"layout/prompt_dim ({layout}, {prompt_dim}) differ from the network's "
            f"({net.layout}, {net.prompt_dim})"
        )
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update(
        {
            f"normalizer.{k}": v.detach().cpu().float().contiguous()
            for k, v in normalizer.state_dict().items()
        }
    )
    # Write to temporary names and rename, JSON last: a crash leaves no half-valid export.
    for stale in (out / CONFIG_NAME,):
        stale.unlink(missing_ok=True)
    tmp_weights = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": FORMAT})
    os.replace(tmp_weights, out / WEIGHTS_NAME)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gap3d_version": __version__,
        "aligner": acfg,
        "layout": layout.to_dict(),
        "prompt_dim": int(prompt_dim),
        "prompt_max_length": int(prompt_max_length),
        "weights_sha256": _sha256(out / WEIGHTS_NAME),
        # the exact encoders the aligner learned from (resolved hub commits / weight hashes);
        # gap3d generate and eval refuse others (gap3d/encoders/pinning.py)
        "encoders": encoder_pins(dict(manifest or {})),
        "manifest": dict(manifest or {}),
        "extra": dict(extra or {}),
    }
    tmp_json = out / (CONFIG_NAME + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=2, default=_jsonable))
    os.replace(tmp_json, out / CONFIG_NAME)
    return out


@dataclass
class LoadedAligner:
    """An exported aligner ready for sampling (eval mode, on ``device``)."""

    net: AlignerNet
    flow: FlowMatching
    normalizer: TokenNormalizer
    layout: TokenLayout
    prompt_dim: int
    prompt_max_length: int
    manifest: dict[str, Any]
    config: dict[str, Any] = field(repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.no_grad()
    def sample(
        self,
        hidden: Tensor | np.ndarray,
        mask: Tensor | np.ndarray,
        steps: int = 30,
        cfg_scale: float = 3.0,
        seed: int = 0,
        n_samples: int = 1,
        progress: bool = False,
    ) -> Tensor:
        """Prompt latents ``(B, L, D)`` + mask ``(B, L)`` -> tokens ``(B * n_samples, T, C)``.

        Tokens are de-normalised into the store's space (what the image encoder produces and
        the generator consumes). Rows are prompt-major: sample ``j`` of prompt ``i`` is row
        ``i * n_samples + j``. Same inputs and seed on the same device give identical output.
        """
        hidden = torch.as_tensor(hidden, dtype=torch.float32, device=self.device)
        mask = torch.as_tensor(mask, device=self.device).bool()
        if hidden.ndim != 3 or hidden.shape[-1] != self.prompt_dim:
            raise ValueError(
                f"prompt hidden states must be (B, L, {self.prompt_dim}) for this aligner (its "
                f"prompt encoder: {self.manifest.get('prompt_encoder', 'see aligner.json')}), "
                f"got {tuple(hidden.shape)}"
            )
        if mask.shape != hidden.shape[:2]:
            raise ValueError(f"mask must be {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        hidden = hidden.repeat_interleave(n_samples, dim=0)
        mask = mask.repeat_interleave(n_samples, dim=0)
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        x0 = self.flow.sample(
            hidden, mask, steps=steps, cfg_scale=cfg_scale, generator=gen, progress=progress
        )
        return self.normalizer.denormalize(x0)


def _read_meta(folder: Path) -> dict[str, Any]:
    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise ExportError(
            f"aligner export folder {folder} does not exist; run `gap3d export` (or pass "
            "--aligner with the folder holding aligner.json)"
        )
    if not cfg_path.is_file():
        raise ExportError(
            f"{folder} holds no {CONFIG_NAME}: not an aligner export, or the export was "
            "interrupted; re-run `gap3d export`"
        )
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{cfg_path} is not valid JSON ({e}); re-run `gap3d export`") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{cfg_path} is not a gap3d aligner export (format != {FORMAT!r})")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ExportError(
            f"{cfg_path} has format_version {meta['format_version']}, newer than this gap3d "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade gap3d"
        )
    missing = [k for k in ("aligner", "layout", "prompt_dim", "prompt_max_length") if k not in meta]
    if missing:
        raise ExportError(f"{cfg_path} lacks {missing}; re-run `gap3d export`")
    if not weights.is_file():
        raise ExportError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; re-run export")
    want = meta.get("weights_sha256")
    if want and _sha256(weights) != want:
        raise ExportError(
            f"{weights} does not match the checksum in {CONFIG_NAME} (corrupt or replaced); "
            "re-run `gap3d export`"
        )
    return meta


def load_aligner(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedAligner:
    """Load an export folder (or its ``aligner.json`` / ``aligner.safetensors``)."""
    folder = Path(path)
    if folder.suffix in (".json", ".safetensors"):
        folder = folder.parent
    meta = _read_meta(folder)
    device = torch.device(device)
    layout = TokenLayout.from_dict(meta["layout"])
    acfg = aligner_config_from_dict(meta["aligner"])
    try:
        tensors = load_file(str(folder / WEIGHTS_NAME))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"cannot read {folder / WEIGHTS_NAME} ({e}); re-run export") from e
    net_state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    norm_state = {k[11:]: v for k, v in tensors.items() if k.startswith("normalizer.")}
    net = AlignerNet(layout, int(meta["prompt_dim"]), acfg)
    try:
        net.load_state_dict(net_state, strict=True)
        normalizer = TokenNormalizer.from_state_dict(layout, norm_state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ExportError(
            f"weights in {folder / WEIGHTS_NAME} do not fit the network described by "
            f"{CONFIG_NAME}: {e}"
        ) from e
    net.to(device).eval()
    normalizer.to(device)
    return LoadedAligner(
        net=net,
        flow=FlowMatching(net, layout),
        normalizer=normalizer,
        layout=layout,
        prompt_dim=int(meta["prompt_dim"]),
        prompt_max_length=int(meta["prompt_max_length"]),
        manifest=dict(meta.get("manifest") or {}),
        config=meta,
        device=device,
    )
