"""Generator adapters, chosen by name in one place (``generator.name``).

* ``retrieval`` (CPU, the demo default): nearest asset of a library by token similarity;
* ``trellis`` (CUDA): TRELLIS-image-large's own pipeline stages, conditioned on the tokens;
* ``features``: the tokens only, for any external generator.

Adapter modules are imported on first use so that a missing optional dependency (TRELLIS)
only hurts the adapter that needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

from gap3d.config import Gap3dConfig
from gap3d.inference.generators.base import Generator, check_tokens, layout_from_manifest

# name -> "module:factory"; each factory is ``factory(cfg, manifest) -> Generator``.
GENERATORS: dict[str, str] = {
    "retrieval": "gap3d.inference.generators.retrieval:build",
    "trellis": "gap3d.inference.generators.trellis:build",
    "features": "gap3d.inference.generators.features:build",
}

__all__ = ["GENERATORS", "Generator", "build_generator", "check_tokens", "layout_from_manifest"]


def build_generator(
    cfg: Gap3dConfig, manifest: dict[str, Any], name: str | None = None
) -> Generator:
    """Build the adapter ``name`` (default ``cfg.generator.name``) for a store manifest."""
    name = name or cfg.generator.name
    if name not in GENERATORS:
        raise ValueError(f"unknown generator '{name}' (available: {', '.join(sorted(GENERATORS))})")
    module_name, factory = GENERATORS[name].split(":")
    return getattr(importlib.import_module(module_name), factory)(cfg, manifest)
