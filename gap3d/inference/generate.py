"""``gap3d generate``: prompt -> prompt encoder (live) -> aligner sampling -> generator adapter.

The prompt encoder is rebuilt from what the export recorded (the store manifest it was trained
on), so generation uses the very encoder and template whose hidden states the aligner saw; a
config naming a different one is refused rather than silently mixed. Outputs of one call:

    <out>/tokens.safetensors   generated tokens (n_samples, T, C) float32 + layout metadata
    <out>/pca.png              PCA-RGB of each sample's patch grid (one basis fitted jointly)
    <out>/result.json          prompt, settings, timings per stage, generator outputs
    <out>/...                  the generator's files (retrieval: asset.glb + preview_*.png)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file

from gap3d.config import Gap3dConfig, PromptEncoderConfig
from gap3d.inference.pca import pca_rgb, save_pca_panel

__all__ = ["GenerateResult", "GenerateSession", "generate", "cli_main", "read_export_manifest"]

# Fields of the prompt encoder config that decide what its hidden states *are*; a config naming
# other values is refused. Device, batch size and compute dtype may differ between caching and
# generation. The revision is not compared with the config: the encoder is rebuilt at the
# recorded (resolved) one, and check_prompt_encoder compares the exact weights afterwards.
_IDENTITY = ("name", "model", "template", "max_length", "pooled_token")
# Recorded fields the encoder is rebuilt with (the pinned commit, the prompt-image size).
_REBUILD = (*_IDENTITY, "revision", "image_max_pixels")


@dataclass
class GenerateResult:
    """What one ``generate`` call produced."""

    out_dir: Path
    tokens: torch.Tensor  # (n_samples, T, C) float32, image-encoder space
    result: dict[str, Any] = field(default_factory=dict)  # the content of result.json

    @property
    def timings(self) -> dict[str, float]:
        return self.result.get("timings_s", {})


def _slug(text: str, n: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "prompt"


def read_export_manifest(aligner_dir: str | Path) -> dict[str, Any]:
    """The store manifest recorded in ``<aligner_dir>/aligner.json``, read without loading
    any weights (so bad requests fail before heavy work)."""
    path = Path(aligner_dir) / "aligner.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no exported aligner at {aligner_dir} ({path.name} missing): train one with "
            "`gap3d train --config <preset>` (it exports at the end) or `gap3d export`, or pass "
            "--aligner FOLDER"
        )
    meta = json.loads(path.read_text())
    for key in ("manifest", "store_manifest"):
        if isinstance(meta.get(key), dict):
            return meta[key]
    raise ValueError(f"{path} records no store manifest; re-export the aligner")


def prompt_encoder_config(cfg: Gap3dConfig, manifest: dict[str, Any]) -> PromptEncoderConfig:
    """The recorded prompt encoder config; refuse a config that names a different one."""
    info = manifest.get("prompt_encoder") or {}
    if not info.get("name"):
        raise ValueError("the aligner's store manifest does not record its prompt encoder")
    mine = dataclasses.asdict(cfg.prompt_encoder)
    if "template" not in info and manifest.get("prompt_template"):
        info = {**info, "template": manifest["prompt_template"]}
    diffs = [(k, info[k], mine[k]) for k in _IDENTITY if k in info and info[k] != mine[k]]
    if diffs:
        lines = "; ".join(f"prompt_encoder.{k}: aligner {a!r} vs config {b!r}" for k, a, b in diffs)
        raise ValueError(
            f"the aligner was trained on a different prompt encoder than the config names "
            f"({lines}). Use the config of the training run (--config ...) or override those keys."
        )
    recorded = {k: info[k] for k in _REBUILD if k in info}
    return PromptEncoderConfig(**{**mine, **recorded})


def check_prompt_encoder(
    manifest: dict[str, Any], live_info: dict[str, Any], allow_mismatch: bool = False
) -> list[str]:
    """Refuse a live prompt encoder whose weights, chat template or settings differ from the
    one recorded in the aligner's store manifest (``EncoderMismatch``, a ValueError).

    With ``allow_mismatch`` the differences are printed and returned instead. Batch callers
    run it once per loaded encoder.
    """
    from gap3d.encoders.pinning import check_encoder

    recorded = manifest.get("prompt_encoder") or {}
    diffs = check_encoder("prompt encoder", recorded, live_info, allow_mismatch)
    for d in diffs:
        print(f"warning: prompt encoder differs from the aligner's (allowed): {d}")
    return diffs


def prompt_image(image: str | Path | Image.Image, manifest: dict[str, Any]) -> Image.Image:
    """The picture of a text+image prompt, read and flattened exactly as the cache did:
    the one conversion path, with the store's alpha background."""
    from gap3d.encoders.image_input import flatten_alpha, load_image

    prep = (manifest.get("image_encoder") or {}).get("preprocessing") or {}
    background = prep.get("alpha_background") or [0, 0, 0]
    return flatten_alpha(load_image(image), [int(v) for v in background])


def _supports_images(info: dict[str, Any]) -> bool:
    if "supports_images" in info:
        return bool(info["supports_images"])
    return info.get("name") == "qwen2_5_vl"


class GenerateSession:
    """Loads the aligner, prompt encoder and generator once; ``run`` handles one prompt.

    ``timings`` holds the one-time ``load_*`` durations and the per-stage durations of the
    latest ``run``.
    """

    def __init__(
        self,
        cfg: Gap3dConfig,
        aligner_dir: str | Path | None = None,
        device: str | None = None,
        generator: str | None = None,
        allow_encoder_mismatch: bool = False,
    ) -> None:
        self.cfg = cfg
        self.allow_encoder_mismatch = allow_encoder_mismatch
        self.aligner_dir = Path(aligner_dir) if aligner_dir else cfg.export_dir
        self.manifest = read_export_manifest(self.aligner_dir)
        self.encoder_cfg = prompt_encoder_config(cfg, self.manifest)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.generator_name = generator or cfg.generator.name
        self.timings: dict[str, float] = {}
        self._aligner: Any = None
        self._encoder: Any = None
        self._generator: Any = None

    def check_image_prompt(self, image: Any) -> None:
        """A text+image prompt needs a VLM prompt encoder: fail before any model loads."""
        info = self.manifest.get("prompt_encoder") or {}
        if image is not None and not _supports_images(info):
            raise ValueError(
                f"--image given, but the aligner's prompt encoder '{info.get('name')}' is "
                "text-only; text+image prompts need a VLM prompt encoder (prompt_encoder.name="
                "qwen2_5_vl, e.g. --config tiny or paper). Drop --image for a text prompt."
            )
        if isinstance(image, (str, Path)) and not Path(image).is_file():
            raise FileNotFoundError(f"--image {image}: no such file")

    def _timed(self, name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.timings[name] = time.perf_counter() - t0
        return out

    @property
    def aligner(self) -> Any:
        if self._aligner is None:
            from gap3d.trainer.export import load_aligner

            self._aligner = self._timed(
                "load_aligner", lambda: load_aligner(self.aligner_dir, self.device)
            )
        return self._aligner

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from gap3d.encoders import build_prompt_encoder

            encoder = self._timed(
                "load_prompt_encoder", lambda: build_prompt_encoder(self.encoder_cfg)
            )
            # the very weights (and chat template) the aligner was trained on, or a refusal
            check_prompt_encoder(self.manifest, encoder.info(), self.allow_encoder_mismatch)
            self._encoder = encoder
        return self._encoder

    @property
    def generator(self) -> Any:
        if self._generator is None:
            from gap3d.inference.generators import build_generator

            self._generator = self._timed(
                "load_generator",
                lambda: build_generator(self.cfg, self.manifest, name=self.generator_name),
            )
        return self._generator

    def load(self, with_generator: bool = True) -> None:
        """Load the aligner, the prompt encoder and (optionally) the generator now."""
        _ = self.aligner, self.encoder
        if with_generator:
            _ = self.generator

    def encode(self, prompts: list[str], images: list[Image.Image | None] | None = None) -> Any:
        """Every state of each prompt, padded to the longest with a mask (the resampler attends
        with it): a text+image prompt keeps all of its image tokens."""
        return self.encoder.encode(prompts, images=images, pad_to_max=False)

    def sample(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        n_samples: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        s = self.cfg.sample
        tokens = self.aligner.sample(
            hidden.to(self.device),
            mask.to(self.device),
            steps=steps or s.steps,
            cfg_scale=s.cfg_scale if cfg_scale is None else cfg_scale,
            seed=s.seed if seed is None else seed,
            n_samples=n_samples or s.n_samples,
        )
        return tokens.float().cpu()

    def run(
        self,
        prompt: str,
        image: str | Path | Image.Image | None = None,
        out_dir: str | Path | None = None,
    ) -> GenerateResult:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("--prompt must be a non-empty text")
        self.check_image_prompt(image)
        pil = None if image is None else prompt_image(image, self.manifest)
        out = Path(out_dir) if out_dir else self.cfg.work / "generate" / _slug(prompt)
        out.mkdir(parents=True, exist_ok=True)
        s = self.cfg.sample
        t0 = time.perf_counter()
        self.load(with_generator=False)  # load (and time) models before timing the prompt
        batch = self._timed("encode_prompt", lambda: self.encode([prompt], [pil] if pil else None))
        tokens = self._timed("sample", lambda: self.sample(batch.hidden, batch.mask))
        self.timings["sample_per_step"] = self.timings["sample"] / s.steps
        layout = self.aligner.layout
        meta = {
            "prompt": prompt,
            "layout": json.dumps(layout.to_dict()),
            "steps": str(s.steps),
            "cfg_scale": str(s.cfg_scale),
            "seed": str(s.seed),
            "space": "image encoder",
        }
        save_file({"tokens": tokens.contiguous()}, str(out / "tokens.safetensors"), metadata=meta)
        titles = [f"sample {i}" for i in range(tokens.shape[0])]
        save_pca_panel(pca_rgb(tokens, layout, joint=True), out / "pca.png", titles)
        self.load()
        gen = self._timed("generator", lambda: self.generator.generate(tokens, out, prompt))
        self.timings["total"] = time.perf_counter() - t0
        result = {
            "prompt": prompt,
            "image": str(image)
            if isinstance(image, (str, Path))
            else (None if image is None else "<PIL>"),
            "aligner": str(self.aligner_dir),
            "generator": self.generator_name,
            "settings": {
                "steps": s.steps,
                "cfg_scale": s.cfg_scale,
                "seed": s.seed,
                "n_samples": s.n_samples,
                "device": self.device,
            },
            "prompt_encoder": self.manifest.get("prompt_encoder"),
            "image_encoder": (self.manifest.get("image_encoder") or {}).get("name"),
            "layout": layout.to_dict(),
            "tokens_shape": list(tokens.shape),
            "files": ["tokens.safetensors", "pca.png", "result.json"] + list(gen.get("files", [])),
            "timings_s": dict(self.timings),
            "output": gen,
        }
        if "best" in gen:
            result["best"] = gen["best"]
        (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
        return GenerateResult(out, tokens, result)


def generate(
    cfg: Gap3dConfig,
    prompt: str,
    image: str | Path | Image.Image | None = None,
    out_dir: str | Path | None = None,
    aligner_dir: str | Path | None = None,
    generator: str | None = None,
    device: str | None = None,
    allow_encoder_mismatch: bool = False,
) -> GenerateResult:
    """One prompt (optionally with an image) -> tokens -> generator outputs under ``out_dir``."""
    session = GenerateSession(
        cfg,
        aligner_dir,
        device=device,
        generator=generator,
        allow_encoder_mismatch=allow_encoder_mismatch,
    )
    session.check_image_prompt(image)
    return session.run(prompt, image, out_dir)


def _summary(res: GenerateResult) -> str:
    r = res.result
    t = r["timings_s"]
    lines = [
        f"prompt: {r['prompt']!r}" + (f" + image {r['image']}" if r.get("image") else ""),
        f"tokens: {tuple(res.tokens.shape)}  ({r['settings']['steps']} steps, CFG "
        f"{r['settings']['cfg_scale']}, seed {r['settings']['seed']})",
    ]
    best = r.get("best")
    if best:
        desc = ", ".join(str(best[k]) for k in ("shape", "colour") if best.get(k) is not None)
        lines.append(f"best asset: {best['asset_id']} ({desc}) score {best['score']:.3f}")
    lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))
    lines.append(f"wrote: {res.out_dir}/ ({', '.join(r['files'])})")
    return "\n".join(lines)


def batch_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    """``gap3d generate --prompts FILE``: models loaded once, one folder per prompt, summary."""
    from gap3d.inference.batch import read_prompt_file, run_batch

    if getattr(args, "image", None):
        raise ValueError(
            "--image applies to a single --prompt; with --prompts give each row's image in an "
            "'image' column of a CSV"
        )
    jobs = read_prompt_file(args.prompts)
    out = Path(args.out) if getattr(args, "out", None) else None
    if out is None:
        out = cfg.work / "generate" / f"batch-{_slug(Path(args.prompts).stem, 32)}"
    session = GenerateSession(
        cfg, getattr(args, "aligner", None), generator=getattr(args, "generator", None)
    )
    if any(j.image for j in jobs):
        session.check_image_prompt(next(j.image for j in jobs if j.image))
    print(f"gap3d generate: {len(jobs)} prompts from {args.prompts} -> {out}/", flush=True)
    session.load()
    rows = run_batch(session, jobs, out)
    failed = [r for r in rows if r["status"] == "failed"]
    reused = sum(r["status"] == "reused" for r in rows)
    print(
        f"done: {len(rows) - len(failed)}/{len(rows)} prompts"
        + (f" ({reused} reused from an earlier run)" if reused else "")
        + f"; summary: {out / 'results.csv'}, {out / 'results.md'}"
    )
    for r in failed:
        print(f"  failed #{r['index']} {r['prompt']!r}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    # The CLI already turned the flags into config overrides; callers that build a namespace
    # themselves (gap3d demo) may set them here too.
    for flag, section, key in (
        ("n_samples", "sample", "n_samples"),
        ("seed", "sample", "seed"),
        ("steps", "sample", "steps"),
        ("cfg_scale", "sample", "cfg_scale"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            setattr(getattr(cfg, section), key, v)
    if getattr(args, "prompts", None):
        return batch_main(cfg, args)
    res = generate(
        cfg,
        args.prompt,
        image=getattr(args, "image", None),
        out_dir=getattr(args, "out", None),
        aligner_dir=getattr(args, "aligner", None),
        generator=getattr(args, "generator", None),
        allow_encoder_mismatch=bool(getattr(args, "allow_encoder_mismatch", False)),
    )
    print(_summary(res))
    return 0
