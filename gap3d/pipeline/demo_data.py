"""``gap3d demo-data``: the embedded demo's asset library and URL list.

Every shape x colour x variant becomes a procedural mesh (``shapes``), saved as GLB and
rendered headless from ``views`` cameras (``render``). Each render gets seeded captions
(``captions``). A seeded share of the (shape, colour) combinations is *held out*: those
assets exist in the library (the retrieval generator and the evaluation need them) but their
rows are marked ``split="heldout"`` so training never sees the combination.

Outputs under ``cfg.assets_dir``::

    meshes/<asset_id>.glb          renders/<asset_id>_<view>.png
    library.json                   written after all files; its fingerprint marks completion
    preview.png                    contact sheet, one tile per asset (held-out framed in red)

and the URL list ``cfg.url_list_path`` (parquet: ``url, caption, asset_id, shape, colour,
split, view``; one row per caption, so ``captions_per_view > 1`` repeats a URL) pointing at ``http://{host}:{port}/renders/<file>``, which the download stage
serves with :func:`gap3d.pipeline.server.serve_directory`. Paths inside ``library.json`` are
relative to the library folder. Re-running with the same config changes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gap3d.config import DemoDataConfig, Gap3dConfig
from gap3d.pipeline import captions, render, shapes

LIBRARY_FILE = "library.json"
PREVIEW_FILE = "preview.png"
# Bump when meshes, renders or captions change for the same config: old libraries rebuild.
LIBRARY_VERSION = 3  # 2: renders are RGBA (alpha = object coverage); 3: richer captions
# Columns the demo URL list carries beside url/caption (kept by the download stage).
DEMO_COLUMNS = ["asset_id", "shape", "colour", "split", "view"]
RENDER_PROCESSES = 2


@dataclass
class AssetSpec:
    """Everything needed to rebuild one asset exactly."""

    asset_id: str
    shape: str
    colour: str
    rgb: tuple[float, float, float]
    variant: int
    scale: float
    proportions: dict[str, float]
    rotation_deg: list[float]
    split: str  # "train" | "heldout"
    views: list[dict[str, Any]] = field(default_factory=list)  # filled after rendering


def _stable_int(text: str) -> int:
    # Python's hash() is salted per process; crc32 keeps seeds stable across runs.
    return zlib.crc32(text.encode())


def choose_heldout(
    shape_names: list[str], colour_names: list[str], fraction: float, seed: int
) -> set[tuple[str, str]]:
    """Seeded (shape, colour) combinations to hold out.

    Takes ``round(fraction * n_combos)`` combinations, skipping any whose removal would leave
    a shape or a colour without a training combination (so fewer may be held out when the grid
    is very small).
    """
    combos = [(s, c) for s in shape_names for c in colour_names]
    target = int(round(fraction * len(combos)))
    rng = np.random.default_rng([seed, 7])
    train_per_shape = {s: len(colour_names) for s in shape_names}
    train_per_colour = {c: len(shape_names) for c in colour_names}
    held: set[tuple[str, str]] = set()
    for i in rng.permutation(len(combos)):
        if len(held) >= target:
            break
        s, c = combos[int(i)]
        if train_per_shape[s] > 1 and train_per_colour[c] > 1:
            held.add((s, c))
            train_per_shape[s] -= 1
            train_per_colour[c] -= 1
    return held


def plan_assets(demo: DemoDataConfig) -> list[AssetSpec]:
    """The full, seeded list of assets for a demo config (nothing is written)."""
    shapes.check_shapes(demo.shapes)
    shapes.check_colours(demo.colours)
    unknown = [c for c in demo.colours if c not in captions.COLOUR_SYNONYMS]
    if unknown:
        raise ValueError(f"data.demo.colours: no caption words for {unknown}")
    held = choose_heldout(demo.shapes, demo.colours, demo.heldout_fraction, demo.seed)
    assets = []
    for shape in demo.shapes:
        for colour in demo.colours:
            for variant in range(demo.variants_per_combo):
                rng = np.random.default_rng(
                    [demo.seed, _stable_int(shape), _stable_int(colour), variant]
                )
                # A torus tilted far would be seen edge-on (like a rod) from some cameras of
                # the ring; kept nearly flat, every camera (25-40 deg up) sees its hole.
                tilt = 10.0 if shape == "torus" else 20.0
                rotation = [
                    round(float(rng.uniform(-tilt, tilt)), 2),
                    round(float(rng.uniform(0.0, 360.0)), 2),
                    round(float(rng.uniform(-tilt, tilt)), 2),
                ]
                assets.append(
                    AssetSpec(
                        asset_id=f"{shape}-{colour}-{variant:02d}",
                        shape=shape,
                        colour=colour,
                        rgb=shapes.colour_rgb(colour),
                        variant=variant,
                        scale=round(float(rng.uniform(0.6, 0.9)), 4),
                        proportions=shapes.sample_proportions(shape, rng),
                        rotation_deg=rotation,
                        split="heldout" if (shape, colour) in held else "train",
                    )
                )
    return assets


def fingerprint(demo: DemoDataConfig) -> str:
    """Hash of everything that changes the library's files (host/port only change URLs)."""
    d = dataclasses.asdict(demo)
    d.pop("host")
    d.pop("port")
    d["_version"] = LIBRARY_VERSION
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_library(assets_dir: str | Path) -> dict[str, Any]:
    """Read ``library.json`` (asset paths in it are relative to ``assets_dir``)."""
    path = Path(assets_dir) / LIBRARY_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no demo asset library at {path}; build it with `gap3d demo-data --config ...`"
        )
    return json.loads(path.read_text())


def _library_complete(root: Path, fp: str) -> dict[str, Any] | None:
    """The existing library if it matches ``fp`` and all its files exist, else None."""
    try:
        lib = load_library(root)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if lib.get("fingerprint") != fp:
        return None
    for a in lib["assets"]:
        if not (root / a["glb"]).exists() or not all(
            (root / v["path"]).exists() for v in a["views"]
        ):
            return None
    return lib


def url_rows(library: dict[str, Any], host: str, port: int) -> dict[str, list[Any]]:
    """URL-list columns (one row per caption of every render) for a server at host:port."""
    base = f"http://{host}:{port}"
    cols: dict[str, list[Any]] = {k: [] for k in ["url", "caption", *DEMO_COLUMNS]}
    for a in library["assets"]:
        for v in a["views"]:
            for cap in v["captions"]:
                cols["url"].append(f"{base}/{v['path']}")
                cols["caption"].append(cap)
                cols["asset_id"].append(a["asset_id"])
                cols["shape"].append(a["shape"])
                cols["colour"].append(a["colour"])
                cols["split"].append(a["split"])
                cols["view"].append(int(v["view"]))
    return cols


def write_url_list(library: dict[str, Any], path: Path, host: str, port: int) -> bool:
    """Write the parquet URL list unless an identical one exists; True if written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(url_rows(library, host, port))
    if path.exists():
        try:
            if pq.read_table(path).equals(table):
                return False
        except (OSError, pa.ArrowInvalid):
            pass  # unreadable leftover: overwrite it
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return True


def write_contact_sheet(library: dict[str, Any], root: Path, out: Path, tile: int = 96) -> None:
    """One tile per asset (first view), a row per shape; held-out assets framed in red."""
    from PIL import Image, ImageDraw

    from gap3d.encoders.image_input import flatten_alpha, load_image

    assets = library["assets"]
    rows = library["shapes"]
    per_row = max(sum(1 for a in assets if a["shape"] == s) for s in rows)
    sheet = Image.new("RGB", (per_row * tile, len(rows) * tile), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    col_of: dict[str, int] = {}
    for a in assets:
        r = rows.index(a["shape"])
        c = col_of.get(a["shape"], 0)
        col_of[a["shape"]] = c + 1
        backdrop = tuple(round(255 * v) for v in render.BACKGROUND)
        im = flatten_alpha(load_image(root / a["views"][0]["path"]), backdrop)
        sheet.paste(im.resize((tile, tile), Image.BILINEAR), (c * tile, r * tile))
        if a["split"] == "heldout":
            draw.rectangle(
                [c * tile, r * tile, (c + 1) * tile - 1, (r + 1) * tile - 1],
                outline=(220, 0, 0),
                width=3,
            )
    sheet.save(out)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def build_demo_library(cfg: Gap3dConfig) -> dict[str, Any]:
    """Build (or reuse) the asset library under ``cfg.assets_dir``; write the URL list.

    Returns the library dict (as stored in ``library.json``). The URL list is written only
    when ``data.source`` is ``demo`` (a user's own ``data.url_list`` is never overwritten).
    """
    demo = cfg.data.demo
    root = cfg.assets_dir
    fp = fingerprint(demo)
    t0 = time.perf_counter()
    lib = _library_complete(root, fp)
    if lib is None:
        lib = _build(demo, root, fp)
        print(
            f"demo-data: {len(lib['assets'])} assets, {lib['n_renders']} renders "
            f"({len(lib['heldout_combos'])} held-out combos) in {time.perf_counter() - t0:.1f}s "
            f"-> {root}"
        )
    else:
        print(f"demo-data: library at {root} is complete (fingerprint {fp}), nothing to build")
    if not (root / PREVIEW_FILE).exists():
        write_contact_sheet(lib, root, root / PREVIEW_FILE)
    if cfg.data.source == "demo":
        if write_url_list(lib, cfg.url_list_path, demo.host, demo.port):
            print(f"demo-data: URL list -> {cfg.url_list_path}")
    return lib


def _build(demo: DemoDataConfig, root: Path, fp: str) -> dict[str, Any]:
    assets = plan_assets(demo)
    _remove_stale(root)
    (root / "meshes").mkdir(parents=True, exist_ok=True)
    (root / "renders").mkdir(parents=True, exist_ok=True)
    view_specs = render.view_specs(demo.views)
    jobs = []
    for a in assets:
        glb = root / "meshes" / f"{a.asset_id}.glb"
        shapes.build_mesh(a.shape, a.proportions, a.scale, a.rotation_deg, a.rgb).export(glb)
        outs = tuple(str(root / "renders" / f"{a.asset_id}_{v.index}.png") for v in view_specs)
        jobs.append(render.RenderJob(str(glb), a.rgb, tuple(view_specs), outs))
    stats = render.render_jobs(
        jobs,
        demo.render_size,
        processes=min(RENDER_PROCESSES, os.cpu_count() or 1),
        desc="demo renders",
    )
    for a, job_stats in zip(assets, stats, strict=True):
        for v, st in zip(view_specs, job_stats, strict=True):
            rng = np.random.default_rng([demo.seed, _stable_int(a.asset_id), v.index, 1])
            a.views.append(
                {
                    "view": v.index,
                    "azimuth_deg": v.azimuth_deg,
                    "elevation_deg": v.elevation_deg,
                    "path": f"renders/{a.asset_id}_{v.index}.png",
                    "captions": captions.make_captions(
                        a.shape,
                        a.colour,
                        demo.captions_per_view,
                        rng,
                        scale=a.scale,
                        proportions=a.proportions,
                        elevation_deg=v.elevation_deg,
                    ),
                    **{k: st[k] for k in ("foreground_fraction", "mean_rgb")},
                }
            )
    held = sorted({(a.shape, a.colour) for a in assets if a.split == "heldout"})
    lib = {
        "format": "gap3d-demo-library",
        "version": LIBRARY_VERSION,
        "fingerprint": fp,
        "config": dataclasses.asdict(demo),
        "render": {
            "size": demo.render_size,
            "background": list(render.BACKGROUND),
            "alpha": "object coverage (straight alpha; backdrop colour under alpha 0)",
            "camera_distance": render.CAMERA_DISTANCE,
            "yfov_deg": 40.0,
        },
        "shapes": list(demo.shapes),
        "colours": {c: list(shapes.colour_rgb(c)) for c in demo.colours},
        "heldout_combos": [list(h) for h in held],
        "n_renders": len(assets) * len(view_specs),
        "assets": [
            {
                "asset_id": a.asset_id,
                "shape": a.shape,
                "colour": a.colour,
                "rgb": list(a.rgb),
                "variant": a.variant,
                "scale": a.scale,
                "proportions": a.proportions,
                "rotation_deg": a.rotation_deg,
                "split": a.split,
                "glb": f"meshes/{a.asset_id}.glb",
                "views": a.views,
            }
            for a in assets
        ],
    }
    (root / PREVIEW_FILE).unlink(missing_ok=True)
    _write_json(root / LIBRARY_FILE, lib)  # last: its presence + fingerprint mean "complete"
    return lib


def _remove_stale(root: Path) -> None:
    """Delete the files an older library listed (never anything else in the folder)."""
    try:
        old = load_library(root)
    except (FileNotFoundError, json.JSONDecodeError):
        return
    (root / LIBRARY_FILE).unlink()
    for a in old.get("assets", []):
        (root / a["glb"]).unlink(missing_ok=True)
        for v in a.get("views", []):
            (root / v["path"]).unlink(missing_ok=True)


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    """``gap3d demo-data``: build the library and URL list (no-op when already complete)."""
    build_demo_library(cfg)
    return 0
