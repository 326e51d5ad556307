"""The asset library and its token index for the ``retrieval`` generator.

The library (built by ``gap3d demo-data``) is a folder with ``library.json``, one GLB per
asset and a few rendered views per asset. The index holds the image-encoder tokens of every
render, computed once with **the image encoder named in the store manifest** (the space the
aligner generates in) and cached under ``<library>/index/<key>.safetensors``, where ``key``
hashes the encoder's ``info()`` and the list of render files: a different encoder or a
rebuilt library gets a fresh index, never a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gap3d.config import Gap3dConfig, ImageEncoderConfig
from gap3d.encoders.image_input import load_image
from gap3d.layout import TokenLayout
from gap3d.progress import Progress

__all__ = [
    "LibraryAsset",
    "LibraryIndex",
    "load_library",
    "image_encoder_config_from_manifest",
    "build_library_index",
]


@dataclass
class LibraryAsset:
    """One asset: its id, mesh, rendered views and free-form metadata (shape, colour, split)."""

    asset_id: str
    glb: Path | None
    renders: list[Path]
    meta: dict[str, Any] = field(default_factory=dict)


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def load_library(library_dir: str | Path) -> list[LibraryAsset]:
    """Read ``<library_dir>/library.json`` as written by ``gap3d demo-data``
    (``{"assets": [{"asset_id", "glb", "views": [{"path", ...}], ...}]}``; a bare list of
    assets and ``renders: [path, ...]`` are accepted too). Paths are relative to the folder."""
    library_dir = Path(library_dir)
    path = library_dir / "library.json"
    if not path.exists():
        raise FileNotFoundError(
            f"asset library not found: {path} does not exist. Build the demo library with "
            "`gap3d demo-data --config <preset>` or point generator.library at a library folder."
        )
    data = json.loads(path.read_text())
    records = data.get("assets", data) if isinstance(data, dict) else data
    if isinstance(records, dict):  # {asset_id: record}
        records = [{"asset_id": k, **v} for k, v in records.items()]
    assets = []
    for rec in records:
        aid = _first(rec, "asset_id", "id")
        if aid is None:
            raise ValueError(f"{path}: an asset record has no 'asset_id': {rec}")
        glb = _first(rec, "glb", "glb_path", "mesh", "mesh_path")
        renders = _first(rec, "views", "renders", "render_paths") or []
        if isinstance(renders, str):
            renders = [renders]
        # gap3d demo-data lists views as dicts ({"view", "path", "captions", ...})
        renders = [r["path"] if isinstance(r, dict) else r for r in renders]
        meta = {k: v for k, v in rec.items() if k not in ("renders", "render_paths", "views")}
        meta["asset_id"] = str(aid)
        assets.append(
            LibraryAsset(
                asset_id=str(aid),
                glb=(library_dir / glb) if glb else None,
                renders=[library_dir / r for r in renders],
                meta=meta,
            )
        )
    if not assets:
        raise ValueError(f"{path}: the library has no assets")
    missing = [str(r) for a in assets for r in a.renders if not r.exists()]
    if missing or not any(a.renders for a in assets):
        raise FileNotFoundError(
            f"{path}: {len(missing)} render file(s) missing (first: {missing[:1]}); "
            "re-run `gap3d demo-data`"
        )
    return assets


def image_encoder_config_from_manifest(
    manifest: dict[str, Any], base: ImageEncoderConfig
) -> ImageEncoderConfig:
    """The image encoder the store was written with; device/batch size come from ``base``."""
    info = manifest.get("image_encoder") or {}
    kw: dict[str, Any] = {}
    for key in ("name", "model", "revision"):
        if key in info:
            kw[key] = info[key]
    prep = info.get("preprocessing") or {}
    size = info.get("image_size") or prep.get("image_size")
    if size:
        kw["image_size"] = int(size)
    # the store's preprocessing mode and alpha policy (stores before them: reference, black)
    if prep.get("mode") in ("reference", "trellis"):
        kw["preprocessing"] = prep["mode"]
    if isinstance(prep.get("alpha_background"), list):
        kw["alpha_background"] = [int(v) for v in prep["alpha_background"]]
    if prep.get("background_removal") in ("rembg", "none"):
        kw["background_removal"] = prep["background_removal"]
    if "name" not in kw:
        raise ValueError(
            "the store manifest does not name its image encoder ('image_encoder.name'); cannot "
            "encode the asset library in the same space"
        )
    return ImageEncoderConfig(
        **{**{k: getattr(base, k) for k in ("batch_size", "device", "dtype")}, **kw}
    )


@dataclass
class LibraryIndex:
    """Tokens of every render (``views`` rows) and which asset each view belongs to."""

    assets: list[LibraryAsset]
    tokens: torch.Tensor  # (V, T, C) float32
    view_asset: torch.Tensor  # (V,) int64 index into ``assets``
    layout: TokenLayout
    key: str

    @property
    def asset_ids(self) -> list[str]:
        return [a.asset_id for a in self.assets]


def _index_key(encoder_info: dict[str, Any], assets: list[LibraryAsset], root: Path) -> str:
    h = hashlib.sha256(json.dumps(encoder_info, sort_keys=True, default=str).encode())
    for a in assets:
        for r in a.renders:
            st = r.stat()
            h.update(f"{a.asset_id}|{r.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_library_index(
    cfg: Gap3dConfig,
    manifest: dict[str, Any],
    library_dir: str | Path | None = None,
    encoder: Any = None,
) -> LibraryIndex:
    """Load the cached index for this (encoder, library) pair, or encode the renders once.

    ``encoder`` may be passed to reuse an already built image encoder (its ``info()`` must be
    the manifest's); otherwise it is built from the manifest's recorded config.
    """
    library_dir = Path(library_dir or cfg.assets_dir)
    assets = load_library(library_dir)
    enc_info = manifest.get("image_encoder") or {}
    layout_d = manifest.get("layout") or enc_info.get("layout")
    key = _index_key(enc_info, assets, library_dir)
    cache = library_dir / "index" / f"{key}.safetensors"
    view_asset = torch.tensor(
        [i for i, a in enumerate(assets) for _ in a.renders], dtype=torch.long
    )
    if cache.exists():
        tokens = load_file(str(cache))["tokens"].float()
        if tokens.shape[0] == len(view_asset):
            layout = TokenLayout.from_dict(layout_d) if layout_d else None
            return LibraryIndex(assets, tokens, view_asset, layout or encoder.layout, key)
    if encoder is None:
        from gap3d.encoders import build_image_encoder

        encoder = build_image_encoder(
            image_encoder_config_from_manifest(manifest, cfg.image_encoder)
        )
    # the renders must land in the space the aligner generates in: same weights, same
    # preprocessing and alpha policy as the store, or no index
    from gap3d.encoders.pinning import check_encoder

    check_encoder("image encoder of the retrieval library", enc_info, encoder.info())
    paths = [r for a in assets for r in a.renders]
    bs = max(1, cfg.image_encoder.batch_size)
    chunks = []
    with Progress(len(paths), "encode library renders", unit="img") as bar:
        for i in range(0, len(paths), bs):
            # alpha kept: the encoder applies the store's alpha policy (image_input, one path)
            images = [load_image(p) for p in paths[i : i + bs]]
            chunks.append(encoder.encode(images).float().cpu())
            bar.update(len(images))
    tokens = torch.cat(chunks)
    layout = TokenLayout.from_dict(layout_d) if layout_d else encoder.layout
    if tuple(tokens.shape[1:]) != (layout.n_tokens, layout.channels):
        raise ValueError(
            f"library tokens {tuple(tokens.shape)} do not match the store layout {layout}; "
            "the image encoder differs from the one in the store manifest"
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    # float16 halves the cache; retrieval scores are insensitive to it. Write to a temp file
    # and rename so a concurrent reader never sees half an index.
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
    os.close(fd)
    save_file({"tokens": tokens.half().contiguous()}, tmp, metadata={"key": key})
    os.replace(tmp, cache)
    meta = {
        "key": key,
        "image_encoder": enc_info,
        "asset_ids": [a.asset_id for a in assets],
        "views": [str(p.relative_to(library_dir)) for p in paths],
    }
    (cache.with_suffix(".json")).write_text(json.dumps(meta, indent=1, default=str))
    return LibraryIndex(assets, tokens.half().float(), view_asset, layout, key)
