"""``trellis`` generator: TRELLIS-image-large conditioned on generated DINOv2-reg tokens.

No fork of TRELLIS: its ``TrellisImageTo3DPipeline`` stages take any conditioning dict, so the
image branch (``get_cond``) is simply skipped and our tokens go in where DINOv2's would
(``{'cond': tokens, 'neg_cond': zeros_like(tokens)}``, exactly what ``get_cond`` builds):

    coords = pipeline.sample_sparse_structure(cond, 1, sampler_params={...})
    slat   = pipeline.sample_slat(cond, coords, sampler_params={...})
    out    = pipeline.decode_slat(slat, formats=["mesh", "gaussian"])
    glb    = trellis.utils.postprocessing_utils.to_glb(out["gaussian"][0], out["mesh"][0])

TRELLIS is CUDA-only and not on PyPI, so it is imported lazily and its absence is reported
with the install steps below. Token contract (checked before any GPU work): the layout of
TRELLIS-image-large's conditioning, ``[CLS, 4 registers, 37x37 patches] x 1024`` =
``layer_norm(x_prenorm)`` of DINOv2 ViT-L/14-reg at 518 px without affine parameters, in that
space (no gap3d normalisation), float32 on the pipeline's device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gap3d.config import Gap3dConfig, GeneratorConfig
from gap3d.inference.generators.base import Generator, check_tokens, layout_from_manifest
from gap3d.layout import TokenLayout

log = logging.getLogger(__name__)

# TRELLIS-image-large conditions on DINOv2 ViT-L/14-reg at 518 px (docs/METHOD.md, "Token contract").
TRELLIS_LAYOUT = TokenLayout(n_cls=1, n_registers=4, grid_h=37, grid_w=37, channels=1024)

INSTALL_HELP = """\
The 'trellis' generator needs TRELLIS (https://github.com/microsoft/TRELLIS) and a CUDA GPU.
TRELLIS is not a pip package; install it next to gap3d:
    git clone --recurse-submodules https://github.com/microsoft/TRELLIS.git
    cd TRELLIS && . ./setup.sh --basic --xformers --flash-attn --diffoctreerast --spconv \\
        --mipgaussian --kaolin --nvdiffrast
    export PYTHONPATH=$PWD:$PYTHONPATH
The weights (generator.trellis_model, default microsoft/TRELLIS-image-large) are fetched from
the Hugging Face hub on first use, or give a local folder. Without a GPU use
`--generator retrieval` (demo library) or `--generator features` (tokens only)."""

__all__ = ["TRELLIS_LAYOUT", "INSTALL_HELP", "TrellisGenerator", "check_trellis_contract", "build"]


def check_trellis_contract(layout: TokenLayout, image_encoder_info: dict[str, Any]) -> None:
    """Refuse a store whose tokens are not TRELLIS-image-large's conditioning."""
    name = image_encoder_info.get("name")
    if name is not None and name != "dinov2_reg":
        raise ValueError(
            f"TRELLIS-image-large is conditioned on DINOv2-reg tokens, but this aligner was "
            f"trained on '{name}' features; train on a store cached with image_encoder.name="
            "dinov2_reg (configs/paper.yaml) or use --generator retrieval/features"
        )
    if layout != TRELLIS_LAYOUT:
        raise ValueError(
            f"TRELLIS-image-large needs tokens laid out as {TRELLIS_LAYOUT} "
            f"(1 + 4 + 37*37 = {TRELLIS_LAYOUT.n_tokens} tokens x 1024, DINOv2 ViT-L/14-reg at "
            f"518 px), but the aligner produces {layout}"
        )


def _token_stats_warning(tokens: torch.Tensor) -> str | None:
    """TRELLIS's tokens are layer-normed without affine: per-token mean ~0, std ~1."""
    mean = tokens.mean(-1).abs().mean().item()
    std = tokens.std(-1).mean().item()
    if mean > 0.5 or not 0.5 < std < 2.0:
        return (
            f"generated tokens have per-token |mean| {mean:.2f} and std {std:.2f}; TRELLIS "
            "expects layer-normed tokens (mean 0, std 1): are they still normalised?"
        )
    return None


def pinned_trellis_path(model: str, revision: str | None) -> tuple[str, str | None]:
    """``(folder or hub id to load, commit)``: a hub model is fetched at its resolved commit
    (TRELLIS's own loader always takes the newest files), a local folder is used as is."""
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser()), None
    from huggingface_hub import snapshot_download

    from gap3d.encoders.pinning import resolve_hub_revision

    commit = resolve_hub_revision(model, revision)
    return snapshot_download(model, revision=commit), commit


def _load_pipeline(model: str, revision: str | None = None) -> Any:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available.\n" + INSTALL_HELP)
    try:
        from trellis.pipelines import TrellisImageTo3DPipeline
    except ImportError as e:
        raise RuntimeError(f"TRELLIS is not importable ({e}).\n{INSTALL_HELP}") from e
    path, _ = pinned_trellis_path(model, revision)
    pipeline = TrellisImageTo3DPipeline.from_pretrained(path)
    pipeline.cuda()
    return pipeline


def _export_glb(outputs: dict[str, Any], path: Path) -> None:
    from trellis.utils import postprocessing_utils

    glb = postprocessing_utils.to_glb(
        outputs["gaussian"][0], outputs["mesh"][0], simplify=0.95, texture_size=1024, verbose=False
    )
    glb.export(str(path))


def _render_previews(outputs: dict[str, Any], out_dir: Path, stem: str) -> list[str]:
    from PIL import Image
    from trellis.utils import render_utils

    frames = render_utils.render_snapshot(
        outputs["gaussian"][0], resolution=512, bg_color=(1, 1, 1), verbose=False
    )["color"]
    names = []
    for v, frame in enumerate(frames):
        name = f"{stem}_view{v}.png"
        Image.fromarray(frame).save(out_dir / name)
        names.append(name)
    return names


class TrellisGenerator(Generator):
    """Runs TRELLIS's two flow stages and the decoders on each generated token grid.

    ``pipeline``, ``export_glb`` and ``render_previews`` can be injected (tests use a fake
    pipeline that records its calls). By default all three are TRELLIS's own; with an injected
    pipeline, previews are rendered only when ``render_previews`` is given too.
    """

    name = "trellis"

    def __init__(
        self,
        layout: TokenLayout,
        settings: GeneratorConfig,
        seed: int = 0,
        pipeline: Any = None,
        export_glb: Callable[[dict[str, Any], Path], None] | None = None,
        render_previews: Callable[[dict[str, Any], Path, str], list[str]] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(layout)
        self.settings = settings
        self.seed = seed
        self._pipeline = pipeline
        self._export_glb = export_glb or _export_glb
        self._render_previews = (
            render_previews
            if render_previews is not None
            else (_render_previews if pipeline is None else None)
        )
        self.device = torch.device(device) if device is not None else None

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            self._pipeline = _load_pipeline(
                self.settings.trellis_model, self.settings.trellis_revision
            )
        return self._pipeline

    def sampler_params(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Sparse-structure and SLat sampler overrides (TRELLIS-image-large defaults)."""
        s = self.settings
        interval = [float(x) for x in s.cfg_interval]
        ss = {"steps": s.ss_steps, "cfg_strength": s.ss_cfg, "cfg_interval": interval}
        slat = {"steps": s.slat_steps, "cfg_strength": s.slat_cfg, "cfg_interval": interval}
        return ss, slat

    def generate(self, tokens: torch.Tensor, out_dir: Path, prompt: str) -> dict[str, Any]:
        check_tokens(tokens, self.layout, "trellis generator")
        warning = _token_stats_warning(tokens.float())
        if warning:
            log.warning(warning)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        pipe = self.pipeline
        device = self.device or getattr(pipe, "device", None) or torch.device("cuda")
        # float32: TRELLIS's flow models cast the condition to their own dtype internally.
        cond_all = tokens.detach().to(device=device, dtype=torch.float32)
        ss_params, slat_params = self.sampler_params()
        samples = []
        for i in range(cond_all.shape[0]):
            cond = {"cond": cond_all[i : i + 1], "neg_cond": torch.zeros_like(cond_all[i : i + 1])}
            torch.manual_seed(self.seed + i)  # TRELLIS draws its noise from the global RNG
            coords = pipe.sample_sparse_structure(cond, 1, sampler_params=dict(ss_params))
            slat = pipe.sample_slat(cond, coords, sampler_params=dict(slat_params))
            outputs = pipe.decode_slat(slat, formats=["mesh", "gaussian"])
            glb = f"sample_{i}.glb"
            self._export_glb(outputs, out_dir / glb)
            entry: dict[str, Any] = {"glb": glb, "n_voxels": int(getattr(coords, "shape", [0])[0])}
            if self._render_previews is not None:
                entry["previews"] = self._render_previews(outputs, out_dir, f"sample_{i}")
            samples.append(entry)
        files = [s["glb"] for s in samples] + [p for s in samples for p in s.get("previews", [])]
        return {
            "model": self.settings.trellis_model,
            "revision": self.settings.trellis_revision,
            "sparse_structure_sampler": ss_params,
            "slat_sampler": slat_params,
            "samples": samples,
            "files": files,
            "warning": warning,
        }


def build(cfg: Gap3dConfig, manifest: dict[str, Any]) -> TrellisGenerator:
    layout = layout_from_manifest(manifest)
    check_trellis_contract(layout, manifest.get("image_encoder") or {})
    return TrellisGenerator(layout, cfg.generator, seed=cfg.sample.seed)
