"""Shared builders for the inference / eval / notebook tests (tiny preset, CPU, seconds).

* a small asset library in the ``library.json`` format of ``gap3d demo-data`` (flat-shaded
  2-D shapes drawn with PIL as "renders", a trimesh box as every GLB) — drawing is enough here
  and keeps these tests independent of the renderer;
* a real Zarr feature store of those renders, encoded with the tiny preset's real encoders
  (tiny random Qwen2.5-VL + DINOv2-reg loaded through ``from_pretrained``);
* an aligner export of a randomly initialised tiny ``AlignerNet`` (plumbing, not quality).

Everything is built once per test session (module-level cache) under a pytest temp folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
HELDOUT = {("triangle", "blue"), ("circle", "green")}
VIEWS = 2


@dataclass
class TinySetup:
    root: Path
    library: Path
    store_path: Path
    export_dir: Path
    overrides: list[str]

    def cfg(self, *extra: str):  # noqa: ANN201 - Gap3dConfig
        from gap3d.config import load_config

        return load_config("tiny", [*self.overrides, *extra])


_CACHE: dict[str, TinySetup] = {}


def _draw(shape: str, rgb: tuple[int, int, int], view: int, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    r = size * (0.30 + 0.08 * view)
    c = size / 2 + (view * 3 - 2)
    if shape == "square":
        d.rectangle([c - r, c - r, c + r, c + r], fill=rgb)
    elif shape == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=rgb)
    else:
        pts = [
            (c + r * math.cos(a), c + r * math.sin(a))
            for a in (-math.pi / 2 + view * 0.3 + k * 2 * math.pi / 3 for k in range(3))
        ]
        d.polygon(pts, fill=rgb)
    return img


def build_library(root: Path) -> Path:
    """``library.json`` (the format of ``gap3d demo-data``) + renders + GLBs, 3 shapes x 3
    colours x 2 views."""
    import trimesh

    root.mkdir(parents=True, exist_ok=True)
    (root / "renders").mkdir(exist_ok=True)
    (root / "meshes").mkdir(exist_ok=True)
    glb_bytes = trimesh.creation.box().export(file_type="glb")
    assets = []
    for shape in SHAPES:
        for colour, rgb in COLOURS.items():
            aid = f"{shape}-{colour}-0"
            views = []
            for v in range(VIEWS):
                rel = f"renders/{aid}_{v}.png"
                _draw(shape, rgb, v).save(root / rel)
                views.append({"view": v, "path": rel, "captions": [f"a {colour} {shape}"]})
            (root / "meshes" / f"{aid}.glb").write_bytes(glb_bytes)
            split = "heldout" if (shape, colour) in HELDOUT else "train"
            assets.append(
                {
                    "asset_id": aid,
                    "shape": shape,
                    "colour": colour,
                    "split": split,
                    "glb": f"meshes/{aid}.glb",
                    "views": views,
                }
            )
    (root / "library.json").write_text(json.dumps({"assets": assets}, indent=1))
    return root


def build_store(cfg, library: Path, path: Path) -> Path:  # noqa: ANN001
    """A tiny store with one sample per render (caption 'a <colour> <shape>')."""
    from gap3d.encoders import build_image_encoder, build_prompt_encoder
    from gap3d.store import FeatureStore, ShardData, StoreSpec

    assets = json.loads((library / "library.json").read_text())["assets"]
    rows = [(a, v) for a in assets for v in range(len(a["views"]))]
    pe = build_prompt_encoder(cfg.prompt_encoder)
    ie = build_image_encoder(cfg.image_encoder)
    images = [Image.open(library / a["views"][v]["path"]).convert("RGB") for a, v in rows]
    captions = [f"a {a['colour']} {a['shape']}" for a, _ in rows]
    tokens = ie.encode(images).numpy()
    prompts = pe.encode(captions, pad_to_max=True)
    S = cfg.data.samples_per_shard
    spec = StoreSpec(
        layout=ie.layout,
        prompt_dim=pe.hidden_size,
        prompt_max_length=cfg.prompt_encoder.max_length,
        n_shards=math.ceil(len(rows) / S),
        samples_per_shard=S,
        encoding="float16",
        prompt_encoder=pe.info(),
        image_encoder=ie.info(),
        prompt_template=cfg.prompt_encoder.template,
        config_hash="test",
    )
    store = FeatureStore.create(path, spec)
    for s in range(spec.n_shards):
        sl = slice(s * S, min((s + 1) * S, len(rows)))
        part = rows[sl]
        store.write_shard(
            s,
            ShardData(
                image_tokens=tokens[sl],
                prompt_latents=prompts.hidden[sl].numpy(),
                prompt_mask=prompts.mask[sl].numpy(),
                caption=captions[sl],
                key=[f"{a['asset_id']}_{v}" for a, v in part],
                url=["" for _ in part],
                split=[a["split"] for a, _ in part],
                meta=[
                    {
                        "asset_id": a["asset_id"],
                        "shape": a["shape"],
                        "colour": a["colour"],
                        "view": v,
                    }
                    for a, v in part
                ],
                reason=["" for _ in part],
                thumbnail=np.stack([np.asarray(im.resize((64, 64))) for im in images[sl]]),
            ),
        )
    return path


def build_export(cfg, store_path: Path, out_dir: Path, seed: int = 0) -> Path:  # noqa: ANN001
    """Export a randomly initialised tiny aligner trained on nothing (plumbing only)."""
    import torch

    from gap3d.store import FeatureStore
    from gap3d.trainer.export import save_export
    from gap3d.trainer.model import AlignerNet
    from gap3d.trainer.normalize import TokenNormalizer

    store = FeatureStore.open(store_path)
    torch.manual_seed(seed)
    net = AlignerNet(store.layout, store.prompt_dim, cfg.aligner)
    # The zero-initialised output head would make the random aligner return pure noise; give
    # it small random weights so outputs depend on the prompt (still meaningless, but real).
    torch.nn.init.normal_(net.head.weight, std=0.05)
    from gap3d.store.stats import to_stats

    norm = TokenNormalizer(store.layout, to_stats(store.moments()))
    return save_export(
        out_dir,
        net,
        norm,
        aligner_cfg=cfg.aligner,
        layout=store.layout,
        prompt_dim=store.prompt_dim,
        prompt_max_length=store.prompt_max_length,
        manifest=store.manifest,
        extra={"note": "random init (tests)"},
    )


def tiny_setup(tmp_path_factory) -> TinySetup:  # noqa: ANN001
    """Library + store + export, built once per session."""
    if "tiny" not in _CACHE:
        root = tmp_path_factory.mktemp("gap3d_inference")
        library = build_library(root / "assets")
        overrides = [f"workdir={root / 'work'}", f"generator.library={library}"]
        from gap3d.config import load_config

        cfg = load_config("tiny", overrides)
        store_path = build_store(cfg, library, Path(cfg.store_path))
        export_dir = build_export(cfg, store_path, cfg.export_dir)
        _CACHE["tiny"] = TinySetup(root, library, store_path, export_dir, overrides)
    return _CACHE["tiny"]
