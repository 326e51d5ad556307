"""Headless CPU rendering of the demo meshes (pyrender through Mesa's software EGL).

Why the process dance: an OpenGL context belongs to the thread that made it, and a process
that forks after creating one hangs (seen with Mesa's EGL). So the parent never touches OpenGL: it spawns
up to ``processes`` workers, each creates one :class:`pyrender.OffscreenRenderer` in its
initializer and renders whole assets (all views of one GLB) per task. Output is deterministic:
fixed cameras, fixed lights, no shadows, supersampled 2x and box-filtered down. Renders are
RGBA PNGs (alpha = object coverage) so that either image-encoder preprocessing mode can use
them (docs/METHOD.md, "Image preprocessing").
"""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from gap3d.pipeline.shapes import srgb_to_linear
from gap3d.progress import Progress

# Light, neutral backdrop: white assets stay visible through shading, black ones through
# contrast. Floats: pyrender reads integer colours as 0-255.
BACKGROUND = (0.84, 0.84, 0.82)
SUPERSAMPLE = 2  # render at 2x and downsample: cheap anti-aliasing, still deterministic
CAMERA_DISTANCE = 2.45  # the longest side of every asset is <= 1, so it fits a 40 deg fov
CAMERA_YFOV = math.radians(40.0)
KEY_DIRECTION = np.array([-0.6, 1.0, 0.5])  # towards the key light, in camera coordinates
KEY_LIGHT, HEAD_LIGHT, AMBIENT = 2.2, 0.7, 0.22


@dataclass(frozen=True)
class ViewSpec:
    """One camera on a ring around the asset (degrees; elevation above the horizon)."""

    index: int
    azimuth_deg: float
    elevation_deg: float


@dataclass(frozen=True)
class RenderJob:
    """All views of one mesh file; ``out_paths[i]`` receives view ``views[i]``.

    ``rgb`` is the display (sRGB) colour the render should show.
    """

    mesh_path: str
    rgb: tuple[float, float, float]
    views: tuple[ViewSpec, ...]
    out_paths: tuple[str, ...]


def view_specs(n_views: int) -> list[ViewSpec]:
    """``n_views`` cameras evenly spaced in azimuth, alternating between two elevations.

    The ring starts at 30 degrees so that the first view of a cube shows two sides and the top.
    """
    return [
        ViewSpec(i, round((30.0 + 360.0 * i / n_views) % 360.0, 3), 25.0 if i % 2 else 40.0)
        for i in range(n_views)
    ]


def look_at(eye: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """Camera-to-world pose (OpenGL: the camera looks down its -z axis, +y is up)."""
    target = np.zeros(3) if target is None else target
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right = right / np.linalg.norm(right)
    up = np.cross(right, forward)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, up, -forward, eye
    return pose


def camera_pose(view: ViewSpec, distance: float = CAMERA_DISTANCE) -> np.ndarray:
    az, el = math.radians(view.azimuth_deg), math.radians(view.elevation_deg)
    eye = distance * np.array(
        [math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)]
    )
    return look_at(eye)


def rgba_from_render(colour: np.ndarray, mask: np.ndarray, factor: int) -> np.ndarray:
    """Supersampled render ``(H, W, 3)`` uint8 + object mask -> box-downsampled RGBA uint8.

    Alpha is the object's coverage of each output pixel; colour is the object's own colour
    (straight alpha, the PNG convention), and the backdrop colour where nothing is covered.
    Compositing the result onto :data:`BACKGROUND` gives the plain box-downsampled render
    back, so an encoder that flattens alpha onto that colour sees what it saw before renders
    carried alpha; one that premultiplies onto black (TRELLIS) sees the object alone.
    """
    h, w = mask.shape
    oh, ow = h // factor, w // factor

    def box(a: np.ndarray) -> np.ndarray:
        a = a[: oh * factor, : ow * factor].astype(np.float64)
        return a.reshape(oh, factor, ow, factor, *a.shape[2:]).mean(axis=(1, 3))

    alpha = box(mask)
    premultiplied = box(colour * mask[..., None])
    backdrop = np.asarray(BACKGROUND, np.float64) * 255.0
    rgb = np.where(
        alpha[..., None] > 0, premultiplied / np.maximum(alpha[..., None], 1e-12), backdrop
    )
    out = np.concatenate([rgb, alpha[..., None] * 255.0], axis=-1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# worker side: everything below runs in spawned processes only
# --------------------------------------------------------------------------------------------

_RENDERER: Any = None  # one OffscreenRenderer per worker process, made by _init_worker


def _init_worker(px: int) -> None:
    # Must be set before pyrender (PyOpenGL) is imported; respect a user's choice (osmesa).
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import pyrender

    global _RENDERER
    _RENDERER = pyrender.OffscreenRenderer(px, px)


def _render_job(job: RenderJob) -> list[dict[str, Any]]:
    """Render every view of one asset, write PNGs, return per-view foreground statistics."""
    import pyrender
    import trimesh
    from PIL import Image

    mesh = trimesh.load(job.mesh_path, force="mesh")
    # smooth_shaded keeps sharp edges (cube, pyramid, cylinder rims) sharp and curved
    # surfaces smooth, so one code path suits every shape.
    material = pyrender.MetallicRoughnessMaterial(
        baseColorFactor=[*srgb_to_linear(job.rgb), 1.0], metallicFactor=0.0, roughnessFactor=0.7
    )
    pr_mesh = pyrender.Mesh.from_trimesh(mesh.smooth_shaded, material=material, smooth=True)

    scene = pyrender.Scene(bg_color=[*BACKGROUND, 1.0], ambient_light=[AMBIENT] * 3)
    scene.add(pr_mesh)
    camera_node = scene.add(pyrender.PerspectiveCamera(yfov=CAMERA_YFOV, aspectRatio=1.0))
    # A key light above and to the left of the camera plus a weak head light: the top, left
    # and right faces of a box get three clearly different shades in every view (a white box
    # on the light backdrop stays visible), and each view is lit the same way.
    key_node = scene.add(pyrender.DirectionalLight(color=[1.0, 1.0, 1.0], intensity=KEY_LIGHT))
    head_node = scene.add(pyrender.DirectionalLight(color=[1.0, 1.0, 1.0], intensity=HEAD_LIGHT))

    stats = []
    for view, out in zip(job.views, job.out_paths, strict=True):
        pose = camera_pose(view)
        scene.set_pose(camera_node, pose)
        scene.set_pose(head_node, pose)
        scene.set_pose(key_node, look_at(pose[:3, :3] @ KEY_DIRECTION))
        colour, depth = _RENDERER.render(scene)
        mask = depth > 0
        Image.fromarray(rgba_from_render(colour[:, :, :3], mask, SUPERSAMPLE)).save(
            out, format="PNG"
        )
        fg = colour[:, :, :3][mask]
        stats.append(
            {
                "view": view.index,
                "foreground_fraction": round(float(mask.mean()), 4),
                "mean_rgb": [round(float(c), 4) for c in (fg.mean(0) / 255.0)]
                if len(fg)
                else [0.0, 0.0, 0.0],
            }
        )
    return stats


# --------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------


def render_jobs(
    jobs: list[RenderJob], size: int, *, processes: int = 2, desc: str = "render"
) -> list[list[dict[str, Any]]]:
    """Render all jobs at ``size`` x ``size`` px in up to ``processes`` spawned workers.

    Returns, per job, one dict per view with ``foreground_fraction`` and ``mean_rgb`` (floats
    in [0, 1], averaged over the object's pixels), in job order.
    """
    if not jobs:
        return []
    if size <= 0:
        raise ValueError(f"render size must be > 0, got {size}")
    n_views = sum(len(j.views) for j in jobs)
    # A spawned worker costs ~1 s to start; small libraries are faster with one of them.
    n_proc = max(1, min(processes, len(jobs), math.ceil(n_views / 64)))
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    ctx = multiprocessing.get_context("spawn")
    out: list[list[dict[str, Any]]] = []
    with ProcessPoolExecutor(
        n_proc, mp_context=ctx, initializer=_init_worker, initargs=(size * SUPERSAMPLE,)
    ) as pool:
        chunk = max(1, len(jobs) // (4 * n_proc))
        with Progress(n_views, desc, unit="img") as bar:
            for job, stats in zip(jobs, pool.map(_render_job, jobs, chunksize=chunk), strict=True):
                out.append(stats)
                bar.update(len(job.views))
    return out
