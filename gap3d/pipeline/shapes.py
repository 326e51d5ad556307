"""Procedural meshes and named colours for the embedded demo asset library.

Each shape is a small builder that turns a few *proportion* parameters into a trimesh mesh.
:func:`sample_proportions` draws those parameters from a seeded generator and
:func:`build_mesh` normalises the result: y is up (the OpenGL/glTF convention the renderer
uses), the bounding box is centred on the origin and its longest side is ``scale``, and the
asset's rotation is applied last. The same spec therefore always gives the same vertices,
which keeps the GLB files, the renders and the retrieval library reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import trimesh
from trimesh import creation

# Named colours -> linear RGB in [0, 1]. Saturated and well separated so that a render's mean
# foreground colour identifies its name (the tests and the demo's colour-retrieval metric rely
# on that). "gray" is accepted as a spelling of "grey".
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.08, 0.08),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.25, 0.85),
    "yellow": (0.92, 0.82, 0.10),
    "orange": (0.95, 0.45, 0.05),
    "purple": (0.50, 0.15, 0.70),
    "white": (0.95, 0.95, 0.95),
    "black": (0.06, 0.06, 0.06),
    "grey": (0.50, 0.50, 0.50),
    "pink": (0.95, 0.45, 0.65),
    "brown": (0.45, 0.27, 0.10),
    "cyan": (0.10, 0.75, 0.80),
}
_COLOUR_ALIASES = {"gray": "grey", "violet": "purple"}

Proportions = dict[str, float]


def _z_to_y_up(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """trimesh builds solids of revolution along +z; the renderer and glTF use +y as up."""
    mesh.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0]))
    return mesh


def _cube(p: Proportions) -> trimesh.Trimesh:
    return creation.box(extents=(1.0, 1.0, 1.0))


def _cuboid(p: Proportions) -> trimesh.Trimesh:
    return creation.box(extents=(p["width"], p["height"], p["depth"]))


def _sphere(p: Proportions) -> trimesh.Trimesh:
    return creation.icosphere(subdivisions=3, radius=0.5)


def _cylinder(p: Proportions) -> trimesh.Trimesh:
    return _z_to_y_up(creation.cylinder(radius=0.5, height=p["height"], sections=48))


def _cone(p: Proportions) -> trimesh.Trimesh:
    return _z_to_y_up(creation.cone(radius=0.5, height=p["height"], sections=48))


def _torus(p: Proportions) -> trimesh.Trimesh:
    return _z_to_y_up(
        creation.torus(
            major_radius=0.5,
            minor_radius=0.5 * p["thickness"],
            major_sections=48,
            minor_sections=24,
        )
    )


def _capsule(p: Proportions) -> trimesh.Trimesh:
    return _z_to_y_up(creation.capsule(height=p["height"], radius=0.5, count=[24, 24]))


def _pyramid(p: Proportions) -> trimesh.Trimesh:
    # Square base on y = 0, apex above its centre; faces wound counter-clockwise from outside.
    h = p["height"]
    v = np.array([[-0.5, 0, -0.5], [0.5, 0, -0.5], [0.5, 0, 0.5], [-0.5, 0, 0.5], [0, h, 0]])
    f = np.array([[0, 1, 2], [0, 2, 3], [0, 4, 1], [1, 4, 2], [2, 4, 3], [3, 4, 0]])
    mesh = trimesh.Trimesh(vertices=v, faces=f, process=True)
    mesh.fix_normals()
    return mesh


def _prism(p: Proportions) -> trimesh.Trimesh:
    # A cylinder with three sections is a triangular prism; lay it on its side like a tent.
    mesh = creation.cylinder(radius=0.5, height=p["length"], sections=3)
    mesh.apply_transform(trimesh.transformations.rotation_matrix(math.pi / 2, [0, 1, 0]))
    return mesh


def _platonic(name: str) -> Callable[[Proportions], trimesh.Trimesh]:
    def build(p: Proportions) -> trimesh.Trimesh:
        if name == "icosahedron":
            return creation.icosahedron()
        if name == "octahedron":
            v = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
        else:  # tetrahedron
            v = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
        return trimesh.convex.convex_hull(v.astype(float))

    return build


# name -> (builder, {proportion: (low, high)}) ; the ranges keep each shape recognisable.
SHAPES: dict[
    str, tuple[Callable[[Proportions], trimesh.Trimesh], dict[str, tuple[float, float]]]
] = {
    "cube": (_cube, {}),
    "sphere": (_sphere, {}),
    "cylinder": (_cylinder, {"height": (0.7, 1.8)}),
    "cone": (_cone, {"height": (0.8, 1.8)}),
    "torus": (_torus, {"thickness": (0.25, 0.45)}),
    "capsule": (_capsule, {"height": (0.4, 1.2)}),
    "pyramid": (_pyramid, {"height": (0.6, 1.2)}),
    "prism": (_prism, {"length": (0.8, 1.4)}),
    "cuboid": (_cuboid, {"width": (0.4, 1.0), "height": (0.4, 1.0), "depth": (1.0, 1.0)}),
    "tetrahedron": (_platonic("tetrahedron"), {}),
    "octahedron": (_platonic("octahedron"), {}),
    "icosahedron": (_platonic("icosahedron"), {}),
}


def check_shapes(names: list[str]) -> None:
    """Raise a ValueError naming every unknown shape and listing the supported ones."""
    bad = [n for n in names if n not in SHAPES]
    if bad:
        raise ValueError(
            f"data.demo.shapes: unknown shape(s) {bad}; supported: {', '.join(SHAPES)}"
        )


def colour_rgb(name: str) -> tuple[float, float, float]:
    """RGB floats in [0, 1] of a named colour (ValueError listing the known names)."""
    key = _COLOUR_ALIASES.get(name, name)
    if key not in COLOURS:
        raise ValueError(
            f"data.demo.colours: unknown colour '{name}'; supported: {', '.join(COLOURS)}"
        )
    return COLOURS[key]


def srgb_to_linear(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    """Display colour -> linear material colour (glTF base colours are linear; pyrender's
    shader applies a 1/2.2 gamma on output, so 2.2 here makes a render show the named RGB)."""
    return tuple(float(c) ** 2.2 for c in rgb)  # type: ignore[return-value]


def check_colours(names: list[str]) -> None:
    """Raise a ValueError naming every unknown colour."""
    bad = [n for n in names if _COLOUR_ALIASES.get(n, n) not in COLOURS]
    if bad:
        raise ValueError(
            f"data.demo.colours: unknown colour(s) {bad}; supported: {', '.join(COLOURS)}"
        )


def sample_proportions(shape: str, rng: np.random.Generator) -> Proportions:
    """Draw the shape's proportion parameters uniformly from their ranges."""
    check_shapes([shape])
    ranges = SHAPES[shape][1]
    return {k: round(float(rng.uniform(lo, hi)), 4) for k, (lo, hi) in ranges.items()}


def rotation_matrix(rotation_deg: list[float] | tuple[float, float, float]) -> np.ndarray:
    """4x4 homogeneous rotation from (x, y, z) Euler angles in degrees, applied x then y then z."""
    rx, ry, rz = (math.radians(a) for a in rotation_deg)
    return trimesh.transformations.euler_matrix(rx, ry, rz, axes="sxyz")


def build_mesh(
    shape: str,
    proportions: Proportions,
    scale: float,
    rotation_deg: list[float] | tuple[float, float, float],
    rgb: tuple[float, float, float] | None = None,
) -> trimesh.Trimesh:
    """The asset's mesh: y up, centred, longest side ``scale``, rotated, optionally coloured.

    ``rgb`` is the display (sRGB) colour; it is stored linearised as a glTF PBR material so
    that a GLB export carries it.
    """
    check_shapes([shape])
    mesh = SHAPES[shape][0](proportions)
    lo, hi = mesh.bounds
    mesh.apply_translation(-(lo + hi) / 2.0)
    mesh.apply_scale(scale / float(np.max(hi - lo)))
    mesh.apply_transform(rotation_matrix(rotation_deg))
    if rgb is not None:
        mesh.visual = trimesh.visual.TextureVisuals(
            material=trimesh.visual.material.PBRMaterial(
                baseColorFactor=[*srgb_to_linear(rgb), 1.0],
                metallicFactor=0.0,
                roughnessFactor=0.7,
            )
        )
    return mesh
