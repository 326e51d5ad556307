"""What the web app does, without any web framework: one prompt -> files to show.

:class:`AppBackend` wraps :class:`gap3d.inference.generate.GenerateSession` (the same code as
``gap3d generate``), so the app works with whichever generator adapter the config or the
command line names (retrieval on the CPU, TRELLIS where installed, raw features). Models load
once, on the first request, and calls are serialised (a session is not thread-safe). Every
request writes its own folder under ``<workdir>/app/`` (tokens, PCA map, result.json and the
generator's files), which the UI then shows.

Failures a user can fix raise :class:`AppError` with a message saying how (no aligner trained
yet, an image given to a text-only prompt encoder, an empty prompt, an unreadable image).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gap3d.config import Gap3dConfig

__all__ = ["AppError", "AppResult", "AppBackend"]


class AppError(ValueError):
    """A request the app cannot serve; the message tells the user what to do."""


@dataclass
class AppResult:
    """Files of one request (absolute paths) and its result.json content."""

    out_dir: Path
    glb: Path | None
    previews: list[Path] = field(default_factory=list)
    pca: Path | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One markdown line for the UI."""
        r = self.result
        best = r.get("best") or {}
        t = r.get("timings_s", {}).get("total")
        parts = [f"**{r.get('prompt', '')}**"]
        if best.get("asset_id"):
            desc = ", ".join(str(best[k]) for k in ("shape", "colour") if best.get(k))
            parts.append(f"best asset `{best['asset_id']}`" + (f" ({desc})" if desc else ""))
        parts.append(f"generator `{r.get('generator', '?')}`")
        if t is not None:
            parts.append(f"{t:.1f} s")
        return " · ".join(parts)


class AppBackend:
    """Serves generation requests for the UI (see the module docstring)."""

    def __init__(
        self,
        cfg: Gap3dConfig,
        aligner_dir: str | Path | None = None,
        generator: str | None = None,
        out_root: str | Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.aligner_dir = Path(aligner_dir) if aligner_dir else cfg.export_dir
        self.generator_name = generator or cfg.generator.name
        self.out_root = Path(out_root) if out_root else cfg.work / "app"
        self._session: Any = None
        self._lock = threading.Lock()
        self._count = 0

    # ------------------------------------------------------------------------------ state

    def ready(self) -> bool:
        return (self.aligner_dir / "aligner.json").is_file()

    def not_ready_message(self) -> str:
        return (
            f"No aligner trained yet: {self.aligner_dir} holds no exported aligner. Train one "
            f"with `make demo` (or `gap3d train --config {self.cfg.name}`), or start the app "
            "with --aligner FOLDER."
        )

    def _get_session(self) -> Any:
        if self._session is None:
            if not self.ready():
                raise AppError(self.not_ready_message())
            from gap3d.inference.generate import GenerateSession

            try:
                self._session = GenerateSession(
                    self.cfg, self.aligner_dir, generator=self.generator_name
                )
            except (ValueError, FileNotFoundError) as e:
                raise AppError(str(e)) from e
        return self._session

    def supports_images(self) -> bool | None:
        """Whether the aligner's prompt encoder takes images (None: no aligner yet)."""
        if not self.ready():
            return None
        from gap3d.inference.generate import _supports_images, read_export_manifest

        try:
            info = read_export_manifest(self.aligner_dir).get("prompt_encoder") or {}
        except (ValueError, FileNotFoundError):
            return None
        return _supports_images(info)

    def status(self) -> str:
        """Markdown describing what the app will use (shown at the top of the page)."""
        if not self.ready():
            return f"⚠️ {self.not_ready_message()}"
        from gap3d.inference.generate import read_export_manifest

        try:
            m = read_export_manifest(self.aligner_dir)
        except (ValueError, FileNotFoundError) as e:
            return f"⚠️ {e}"
        pe = m.get("prompt_encoder") or {}
        ie = m.get("image_encoder") or {}
        img = "text + image prompts" if self.supports_images() else "text prompts only"
        return (
            f"aligner `{self.aligner_dir}` · prompt encoder `{pe.get('name')}` "
            f"(`{pe.get('model')}`, {img}) · image encoder `{ie.get('name')}` · generator "
            f"`{self.generator_name}`"
        )

    # ------------------------------------------------------------------------------ requests

    def generate(
        self,
        prompt: str,
        image: str | Path | None = None,
        seed: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
    ) -> AppResult:
        """Generate one prompt with the given sampling settings (``None``: the config's)."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise AppError("Type a prompt first (e.g. 'a red cube').")
        if steps is not None and not 1 <= int(steps) <= 1000:
            raise AppError(f"Steps must be between 1 and 1000, got {steps}.")
        if cfg_scale is not None and not 0.0 <= float(cfg_scale) <= 50.0:
            raise AppError(f"CFG scale must be between 0 and 50, got {cfg_scale}.")
        if not self.ready():
            raise AppError(self.not_ready_message())
        if image is not None and not self.supports_images():
            from gap3d.inference.generate import read_export_manifest

            info = read_export_manifest(self.aligner_dir).get("prompt_encoder") or {}
            raise AppError(
                f"This aligner's prompt encoder '{info.get('name')}' is text-only, so it "
                "cannot take an image: remove the image, or use an aligner trained with a "
                "VLM prompt encoder (prompt_encoder.name=qwen2_5_vl, e.g. the tiny or paper "
                "preset)."
            )
        if image is not None and not Path(image).is_file():
            raise AppError(f"The image {image} does not exist.")
        with self._lock:
            session = self._get_session()
            if image is not None:
                from PIL import Image, UnidentifiedImageError

                try:
                    with Image.open(image) as im:
                        im.verify()
                except (UnidentifiedImageError, OSError) as e:
                    raise AppError(f"The image could not be read ({e}).") from e
            self._count += 1
            from gap3d.inference.generate import _slug

            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = self.out_root / f"{stamp}-{self._count:04d}-{_slug(prompt, 32)}"
            old = session.cfg.sample
            s = dataclasses.replace(
                old,
                seed=old.seed if seed is None else int(seed),
                steps=old.steps if steps is None else int(steps),
                cfg_scale=old.cfg_scale if cfg_scale is None else float(cfg_scale),
            )
            session.cfg.sample = s
            try:
                res = session.run(prompt, image, out)
            except (ValueError, RuntimeError, FileNotFoundError) as e:
                raise AppError(f"Generation failed: {e}") from e
            finally:
                session.cfg.sample = old
        files = [str(f) for f in res.result.get("files", [])]
        glb = next((out / f for f in files if f.lower().endswith(".glb")), None)
        previews = [
            out / f
            for f in files
            if f.lower().endswith((".png", ".jpg", ".jpeg")) and Path(f).name != "pca.png"
        ]
        pca = out / "pca.png" if (out / "pca.png").exists() else None
        return AppResult(out, glb, previews, pca, res.result)
