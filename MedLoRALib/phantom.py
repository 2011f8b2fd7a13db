"""Synthetic chest CT with known nodules: the embedded data for the demo and for training tests.

The anatomy is defined in world LPS millimetres (body, fat, ribs, spine, heart, two lungs with
branching vessels, nodules) and evaluated at the world position of every voxel centre, so a nodule
at ``centre_lps`` is really there whatever the grid's spacing or (oblique) direction. A small
point-spread function and correlated noise are applied afterwards, on the voxel grid, as a scanner
would.

The two classes are told apart by shape and texture, not by size or density (DESIGN: "Synthetic
data must not be solvable by a shortcut"):

* benign-like (label 0): smooth ovoids with sharp margins; some calcified (central or popcorn),
  some uniformly ground-glass;
* malignant-like (label 1): lobulated or spiculated outlines with softer margins; some part-solid
  (ground-glass with an irregular solid core).

Both classes draw their diameter from one range and their solid tissue from one density range.
Irregular outlines fill less of the sphere of the nodule's radius, which would make malignant
nodules look dimmer on average; the shares of bright calcified and dim ground-glass benign nodules
(``NoduleMix``) balance that, so a logistic regression on (diameter, mean HU in the sphere) stays
near chance — see ``shortcut_features`` and ``shortcut_auc``.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage

from .atomic import atomic_path, make_dir_public, replace_dir
from .errors import MedLoRAError
from .geometry import Geometry
from .image import CTImage, StudyIds
from .nodule import Nodule

log = logging.getLogger(__name__)

LUNG_HU = -860.0
SOFT_TISSUE_HU = 40.0
FAT_HU = -95.0
BLOOD_HU = 40.0
BONE_HU = 450.0
CORTICAL_HU = 750.0
AIR_HU = -1000.0
MIN_STORED_HU, MAX_STORED_HU = -1024, 3071  # the usual 12-bit CT range

CLEARANCE_MM = 3.0  # lung tissue kept around every nodule (and between nodules)


@dataclass(frozen=True)
class NoduleMix:
    """How often each composition occurs, and the densities both classes share.

    The shares are set so that bright calcified (benign) and dim ground-glass (benign) and
    part-solid (malignant) nodules balance the lower fill of irregular outlines: a logistic
    regression on (diameter, mean HU in the sphere) stays near chance while the solid tissue
    of both classes has one density distribution.
    """

    solid_hu: tuple[float, float] = (-10.0, 80.0)
    ground_glass_hu: tuple[float, float] = (-650.0, -400.0)
    calcium_hu: tuple[float, float] = (350.0, 900.0)
    benign_calcified: float = 0.15
    benign_ground_glass: float = 0.45
    malignant_part_solid: float = 0.15


@dataclass(frozen=True)
class PhantomConfig:
    """What to generate. The defaults (192×160×64 at 0.9×0.9×2.5 mm) take about 0.2 s.

    Args:
        size: voxels along (i, j, k).
        spacing: voxel size in mm along (i, j, k).
        direction: 3×3 (columns: i, j, k axes in LPS) as 9 numbers row-major; None is identity.
        origin_lps: LPS centre of voxel (0, 0, 0); None centres the grid on ``centre_lps``.
        centre_lps: where the middle of the grid (and of the body) lies when ``origin_lps`` is None.
        n_nodules: nodules per phantom.
        malignant_fraction: share of malignant-like nodules (rounded to a whole count).
        diameter_range_mm: both classes draw diameters uniformly from this range.
        edge_margin_mm: nodule centres keep this distance from every face of the grid, so a
            50 mm patch around each fits inside.
        noise_hu: standard deviation of the (correlated) image noise.
        vessels: draw branching pulmonary vessels.
        ribs: draw ribs, sternum and spine.
        mix: how often each nodule composition occurs and the densities both classes share.
        seed: default random seed.
    """

    size: tuple[int, int, int] = (192, 160, 64)
    spacing: tuple[float, float, float] = (0.9, 0.9, 2.5)
    direction: tuple[float, ...] | None = None
    origin_lps: tuple[float, float, float] | None = None
    centre_lps: tuple[float, float, float] = (8.0, 20.0, -140.0)
    n_nodules: int = 4
    malignant_fraction: float = 0.5
    diameter_range_mm: tuple[float, float] = (6.0, 20.0)
    edge_margin_mm: float = 25.0
    noise_hu: float = 20.0
    vessels: bool = True
    ribs: bool = True
    mix: NoduleMix = field(default_factory=lambda: NoduleMix())
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.size) != 3 or min(self.size) < 2:
            raise MedLoRAError(f"phantom size must be 3 voxel counts ≥ 2, got {self.size}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise MedLoRAError(f"phantom spacing must be 3 positive mm values, got {self.spacing}")
        if self.n_nodules < 0 or not 0.0 <= self.malignant_fraction <= 1.0:
            raise MedLoRAError("n_nodules must be ≥ 0 and malignant_fraction in [0, 1], got "
                               f"{self.n_nodules}, {self.malignant_fraction}")
        low, high = self.diameter_range_mm
        if not 0 < low <= high:
            raise MedLoRAError(f"diameter_range_mm must be (low, high) with 0 < low ≤ high, got {self.diameter_range_mm}")
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        if self.direction is not None:
            matrix = np.asarray(self.direction, dtype=float).reshape(3, 3)
            if not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-4):
                raise MedLoRAError(f"phantom direction must be orthonormal, got {matrix.round(4).tolist()}")
            object.__setattr__(self, "direction", tuple(matrix.ravel().tolist()))

    def geometry(self) -> Geometry:
        direction = np.eye(3) if self.direction is None else np.asarray(self.direction).reshape(3, 3)
        if self.origin_lps is not None:
            origin = np.asarray(self.origin_lps, dtype=float)
        else:
            half = (np.asarray(self.size) - 1) / 2.0 * np.asarray(self.spacing)
            origin = np.asarray(self.centre_lps, dtype=float) - direction @ half
        return Geometry(size=self.size, spacing=self.spacing, origin_lps=tuple(origin), direction=direction)


def oblique_direction(degrees: tuple[float, float, float] = (12.0, -8.0, 20.0)) -> tuple[float, ...]:
    """A rotation (about x, then y, then z, in degrees) as a PhantomConfig ``direction``."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).ravel().tolist())


def fibonacci_directions(n: int) -> np.ndarray:
    """(n, 3) unit vectors spread evenly over the sphere."""
    index = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * index / n)
    azimuth = np.pi * (1 + 5 ** 0.5) * index
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# --------------------------------------------------------------------------------------------
# Anatomy (body frame: millimetres from the body centre along LPS x, y, z)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Anatomy:
    """Sizes of the body parts, scaled to the field of view with a little per-case variation."""

    body: tuple[float, float]  # semi-axes x, y
    lung_cx: float
    lung_cy: float
    lung_semi: tuple[float, float]
    half_z: float
    heart_centre: tuple[float, float, float]
    heart_semi: tuple[float, float, float]
    spine_y: float
    spine_r: float
    rib_period: float
    rib_phase: float

    def __post_init__(self) -> None:
        # plain Python floats keep float32 voxel arithmetic in float32 (NumPy scalars would promote it)
        for name, value in vars(self).items():
            object.__setattr__(self, name, tuple(map(float, value)) if isinstance(value, tuple) else float(value))

    @classmethod
    def for_field_of_view(cls, fov_mm: np.ndarray, rng: np.random.Generator) -> _Anatomy:
        jitter = lambda: 1.0 + rng.uniform(-0.04, 0.04)  # noqa: E731
        ax, ay = 0.47 * fov_mm[0] * jitter(), 0.42 * fov_mm[1] * jitter()
        half_z = 0.5 * fov_mm[2]
        return cls(body=(ax, ay), lung_cx=0.47 * ax * jitter(), lung_cy=-0.02 * ay,
                   lung_semi=(0.37 * ax * jitter(), 0.72 * ay * jitter()), half_z=half_z,
                   heart_centre=(0.14 * ax, -0.38 * ay, -0.45 * half_z),
                   heart_semi=(0.36 * ax, 0.34 * ay, 0.8 * half_z),
                   spine_y=0.58 * ay, spine_r=0.12 * ax, rib_period=rng.uniform(22.0, 28.0),
                   rib_phase=rng.uniform(0, 30.0))

    def lung_scale(self, z: np.ndarray) -> np.ndarray:
        """Lungs narrow towards the apex (superior, +z)."""
        t = z / self.half_z
        return 1.0 - 0.12 * t * t - 0.08 * t

    def inside_lung(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        scale = self.lung_scale(z)
        lx, ly = self.lung_semi
        inside = np.zeros(np.broadcast(x, y, z).shape, dtype=bool)
        for side in (1.0, -1.0):
            width = lx * scale * (1.0 + 0.15 * y / ly)  # wider posteriorly (D-shaped)
            u = (x - side * self.lung_cx) / width
            v = (y - self.lung_cy) / (ly * scale)
            inside |= u * u + v * v <= 1.0
        hx, hy, hz = self.heart_centre
        sx, sy, sz = self.heart_semi
        heart = ((x - hx) / sx) ** 2 + ((y - hy) / sy) ** 2 + ((z - hz) / sz) ** 2 <= 1.0
        return inside & ~heart

    def hilum(self, side: float) -> np.ndarray:
        return np.array([side * (self.lung_cx - 0.75 * self.lung_semi[0]), self.lung_cy, 0.1 * self.half_z])


def _body_hu(anatomy: _Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray, rng: np.random.Generator,
             ribs: bool) -> tuple[np.ndarray, np.ndarray]:
    """HU of everything but vessels and nodules, and the lung mask (x, y, z: body-frame mm per voxel)."""
    ax, ay = anatomy.body
    x2, y2 = x * x, y * y
    q2 = x2 / np.float32(ax * ax) + y2 / np.float32(ay * ay)  # (normalised body radius)²
    hu = np.full(q2.shape, AIR_HU, dtype=np.float32)
    hu[q2 <= 1.0] = FAT_HU
    hu[q2 <= 0.92 ** 2] = SOFT_TISSUE_HU
    if ribs:
        band = (q2 > 0.80 ** 2) & (q2 <= 0.88 ** 2) & ~((y < 0) & (x2 < (0.18 * ax) ** 2))
        angle = np.arctan2(y[band], x[band])
        rib_z = z[band] + 0.35 * anatomy.rib_period * np.sin(angle) + anatomy.rib_phase  # posterior ribs sit higher
        on_rib = np.mod(rib_z, anatomy.rib_period) < 0.36 * anatomy.rib_period
        hu[band] = np.where(on_rib, np.float32(BONE_HU), hu[band])
        hu[x2 / np.float32((0.1 * ax) ** 2) + ((y + 0.84 * ay) / np.float32(0.05 * ay)) ** 2 <= 1.0] = BONE_HU  # sternum
        spine2 = x2 + (y - np.float32(anatomy.spine_y)) ** 2
        hu[spine2 <= anatomy.spine_r ** 2] = CORTICAL_HU
        hu[spine2 <= (anatomy.spine_r - 2.0) ** 2] = BONE_HU - 150.0
        canal2 = x2 + (y - np.float32(anatomy.spine_y + 1.35 * anatomy.spine_r)) ** 2
        hu[canal2 <= (0.42 * anatomy.spine_r) ** 2] = 15.0
    lung = anatomy.inside_lung(x, y, z)
    xs, ys, zs = x[lung], y[lung], z[lung]
    texture = np.zeros(xs.shape, dtype=np.float32)
    for wave in fibonacci_directions(6):
        kx, ky, kz = (float(v) for v in wave * 2 * np.pi / rng.uniform(8.0, 30.0))
        texture += np.sin(kx * xs + ky * ys + kz * zs + float(rng.uniform(0, 2 * np.pi)))
    gravity = (45.0 / anatomy.lung_semi[1]) * ys  # dependent (posterior) lung is denser
    hu[lung] = LUNG_HU + gravity + 9.0 * texture
    return hu, lung


# --------------------------------------------------------------------------------------------
# Vessels
# --------------------------------------------------------------------------------------------
def _vessel_tree(anatomy: _Anatomy, rng: np.random.Generator, depth: int = 4,
                 peripheral: int = 200) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments (start, end, radius mm) in the body frame, branching out from each hilum."""
    segments: list[tuple[np.ndarray, np.ndarray, float]] = []

    def grow(start: np.ndarray, heading: np.ndarray, length: float, radius: float, level: int) -> None:
        end = start + heading * length
        segments.append((start, end, radius))
        if level == depth or not anatomy.inside_lung(*end):
            return
        for sign in (1.0, -1.0):
            axis = np.cross(heading, rng.standard_normal(3))
            axis /= np.linalg.norm(axis)
            angle = sign * np.radians(rng.uniform(20.0, 40.0))
            turned = (heading * np.cos(angle) + np.cross(axis, heading) * np.sin(angle)
                      + axis * (axis @ heading) * (1 - np.cos(angle)))
            grow(end, turned / np.linalg.norm(turned), length * rng.uniform(0.65, 0.8), radius * 0.7, level + 1)

    reach = 0.55 * anatomy.lung_semi[1]
    for side in (1.0, -1.0):
        for up in (0.8, 0.0, -0.8):
            heading = np.array([side * 0.8, rng.uniform(-0.3, 0.3), up]) + rng.normal(0, 0.1, 3)
            grow(anatomy.hilum(side), heading / np.linalg.norm(heading), reach * rng.uniform(0.8, 1.1),
                 rng.uniform(2.6, 3.4), 0)
    # small peripheral vessels, pointing roughly away from the hilum, fill the outer lung
    ax, ay = anatomy.body
    spots = rng.uniform(-1, 1, (1500, 3)) * [ax, ay, anatomy.half_z]
    spots = spots[anatomy.inside_lung(*spots.T)][:peripheral]
    for spot in spots:
        outward = spot - anatomy.hilum(np.sign(spot[0]))
        heading = outward / np.linalg.norm(outward) + rng.normal(0, 0.35, 3)
        half = heading / np.linalg.norm(heading) * rng.uniform(3.0, 7.0)
        segments.append((spot - half, spot + half, float(rng.uniform(0.6, 1.2))))
    return segments


def _segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each point (…, 3) to a segment, and the position t ∈ [0, 1] along it."""
    axis = (end - start).astype(points.dtype)
    rel = points - start.astype(points.dtype)
    t = np.clip((rel @ axis) / max(float(axis @ axis), 1e-12), 0.0, 1.0)
    rel -= t[..., None] * axis
    return np.sqrt(np.einsum("...a,...a->...", rel, rel)), t


def _distance_to_segments(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(P, S) distances from each of P points to each of S segments."""
    axis = ends - starts
    rel = points[:, None, :] - starts[None]
    t = np.clip(np.einsum("psa,sa->ps", rel, axis) / np.maximum((axis * axis).sum(-1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(rel - t[..., None] * axis[None], axis=-1)


# --------------------------------------------------------------------------------------------
# Nodules
# --------------------------------------------------------------------------------------------
NoduleKind = Literal["solid", "calcified", "ground-glass", "lobulated", "spiculated", "part-solid"]
_DIRECTIONS = fibonacci_directions(400)


@dataclass
class NoduleShape:
    """One synthetic nodule in world LPS mm: its shape (occupancy) and composition (density)."""

    centre_lps: np.ndarray
    radius: float  # half the recorded diameter
    label: int
    rotation: np.ndarray  # nodule frame → LPS
    kind: NoduleKind = "solid"
    axes: np.ndarray = field(default_factory=lambda: np.ones(3))  # ellipsoid semi-axes / radius (benign)
    bumps: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # lobe directions (malignant)
    bump_amplitude: float = 0.0
    bump_sharpness: float = 8.0
    spicules: list[tuple[np.ndarray, np.ndarray, float, float]] = field(default_factory=list)
    edge_mm: float = 0.35
    base_hu: float = 30.0
    core_hu: float = 30.0
    core_size: float = 0.0  # calcified: blob radius in mm; part-solid: fraction of the outline
    core_centres: np.ndarray = field(default_factory=lambda: np.zeros((1, 3)))
    _bump_mean: float = 0.0
    _outline_scale: float = 1.0

    def __post_init__(self) -> None:
        if len(self.bumps):
            lobes = self._lobe_field(_DIRECTIONS)
            self._bump_mean = float(lobes.mean())
            # scale so the outline encloses the volume of a sphere of the recorded radius
            relative = np.maximum(1 + self.bump_amplitude * (lobes - self._bump_mean), 0.35)
            self._outline_scale = float(np.cbrt(np.mean(relative ** 3)))

    def _lobe_field(self, unit: np.ndarray) -> np.ndarray:
        return np.exp(self.bump_sharpness * (unit @ self.bumps.T - 1.0)).sum(axis=-1)

    def outline_radius(self, unit: np.ndarray) -> np.ndarray:
        """Radius (mm) of the nodule's outline along unit vectors in the nodule frame."""
        if len(self.bumps):
            lobes = self._lobe_field(unit) - self._bump_mean
            return self.radius / self._outline_scale * np.maximum(1 + self.bump_amplitude * lobes, 0.35)
        return self.radius / np.sqrt(((unit / self.axes) ** 2).sum(axis=-1))

    @property
    def extent_mm(self) -> float:
        """Radius of a sphere that holds the whole nodule, spicules included."""
        outline = float(self.outline_radius(_DIRECTIONS).max())
        spicule = max((float(np.linalg.norm(end)) + r0 for _, end, r0, _ in self.spicules), default=0.0)
        return max(outline, spicule) + self.edge_mm

    def _local(self, points_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        local = (points_lps - self.centre_lps) @ self.rotation
        dist = np.linalg.norm(local, axis=-1)
        unit = local / np.maximum(dist, 1e-6)[..., None]
        return local, dist, unit

    @staticmethod
    def _ramp(inside_by_mm: np.ndarray, edge_mm: float) -> np.ndarray:
        return np.clip(0.5 + inside_by_mm / edge_mm, 0.0, 1.0)

    def occupancy(self, points_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fraction of each point inside the nodule, fraction inside its core), each in [0, 1]."""
        local, dist, unit = self._local(points_lps)
        outline = self.outline_radius(unit)
        occupied = self._ramp(outline - dist, self.edge_mm)
        for start, end, r0, r1 in self.spicules:
            reach = 0.5 * float(np.linalg.norm(end - start)) + r0 + 0.5
            near = np.flatnonzero(np.linalg.norm(local - 0.5 * (start + end), axis=-1) <= reach)
            d, t = _segment_distance(local.reshape(-1, 3)[near], start, end)
            flat = occupied.reshape(-1)
            flat[near] = np.maximum(flat[near], self._ramp(r0 + (r1 - r0) * t - d, 0.5))
        return occupied, self._core(local, dist, outline) * occupied

    def _core(self, local: np.ndarray, dist: np.ndarray, outline: np.ndarray) -> np.ndarray:
        if self.kind == "calcified":  # one central or several popcorn blobs
            distances = np.linalg.norm(local[..., None, :] - self.core_centres, axis=-1).min(axis=-1)
            return self._ramp(self.core_size - distances, 0.4)
        if self.kind == "part-solid":  # the outline shrunk: an irregular solid core
            return self._ramp(self.core_size * outline - dist, self.edge_mm)
        return np.zeros_like(dist)

    def density(self, core: np.ndarray) -> np.ndarray:
        return self.base_hu + (self.core_hu - self.base_hu) * core


def _draw_shape(rng: np.random.Generator, centre_lps: np.ndarray, diameter: float, label: int) -> NoduleShape:
    radius = diameter / 2.0
    rotation = _random_rotation(rng)
    if label == 0:
        axes = rng.uniform(0.75, 1.3, 3)
        return NoduleShape(centre_lps=centre_lps, radius=radius, label=0, rotation=rotation, kind="solid",
                           axes=axes / np.cbrt(axes.prod()), edge_mm=rng.uniform(0.25, 0.45))
    kind: NoduleKind = "spiculated" if rng.random() < 0.5 else "lobulated"
    lobulated = kind == "lobulated"
    shape = NoduleShape(centre_lps=centre_lps, radius=radius, label=1, rotation=rotation, kind=kind,
                        bumps=_random_unit(rng, int(rng.integers(5, 10))),
                        bump_amplitude=rng.uniform(0.6, 1.0) if lobulated else rng.uniform(0.25, 0.45),
                        bump_sharpness=rng.uniform(7.0, 14.0), edge_mm=rng.uniform(0.6, 1.1))
    if kind == "spiculated":
        for direction in _random_unit(rng, int(rng.integers(8, 20))):
            surface = float(shape.outline_radius(direction[None])[0])
            length = rng.uniform(0.6, 1.4) * radius + 3.0
            shape.spicules.append((direction * 0.8 * surface, direction * (surface + length),
                                   rng.uniform(0.8, 1.3), rng.uniform(0.3, 0.5)))
    return shape


def _random_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _compose(shape: NoduleShape, rng: np.random.Generator, mix: NoduleMix) -> None:
    """Choose the nodule's composition and densities."""
    solid = float(rng.uniform(*mix.solid_hu))
    shape.base_hu = shape.core_hu = solid
    draw = rng.random()
    if shape.label == 1:
        if draw < mix.malignant_part_solid:
            shape.kind, shape.spicules = "part-solid", []
            shape.base_hu = float(rng.uniform(*mix.ground_glass_hu))
            shape.core_size = float(rng.uniform(0.3, 0.75))
        return
    if draw < mix.benign_calcified:
        shape.kind, shape.core_hu = "calcified", float(rng.uniform(*mix.calcium_hu))
        popcorn = rng.random() < 0.35
        n_blobs = int(rng.integers(3, 6)) if popcorn else 1
        offsets = _random_unit(rng, n_blobs) * rng.uniform(0.2, 0.5) * shape.radius
        shape.core_centres = offsets if popcorn else np.zeros((1, 3))
        shape.core_size = float(rng.uniform(0.15, 0.3) if popcorn else rng.uniform(0.2, 0.5)) * shape.radius
    elif draw < mix.benign_calcified + mix.benign_ground_glass:
        shape.kind, shape.base_hu = "ground-glass", float(rng.uniform(*mix.ground_glass_hu))
        shape.core_hu = shape.base_hu


# --------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------
class _Grid:
    """World coordinates of every voxel centre, relative to the body centre (float32)."""

    def __init__(self, geometry: Geometry, body_centre_lps: np.ndarray) -> None:
        self.geometry = geometry
        self.body_centre = body_centre_lps
        axes = geometry.direction * np.asarray(geometry.spacing)  # column n: mm per step of index n
        i, j, k = (np.arange(n, dtype=np.float64) for n in geometry.size)
        offset = np.asarray(geometry.origin_lps) - body_centre_lps
        self.coords = [(offset[a] + axes[a, 0] * i[None, None, :] + axes[a, 1] * j[None, :, None]
                        + axes[a, 2] * k[:, None, None]).astype(np.float32) for a in range(3)]

    def box(self, centre_lps: np.ndarray, radius_mm: float) -> tuple[slice, ...] | None:
        """Array slices [k, j, i] covering a ball, or None if it misses the grid."""
        ijk = self.geometry.lps_to_ijk(centre_lps)
        half = radius_mm / np.asarray(self.geometry.spacing)
        low = np.maximum(np.floor(ijk - half).astype(int), 0)
        high = np.minimum(np.ceil(ijk + half).astype(int) + 1, self.geometry.size)
        if np.any(high <= low):
            return None
        return tuple(slice(lo, hi) for lo, hi in zip(low[::-1], high[::-1]))

    def points_body(self, box: tuple[slice, ...]) -> np.ndarray:
        """(…, 3) float32 positions of the voxels in a box, in mm from the body centre."""
        return np.stack([c[box] for c in self.coords], axis=-1)

    def points_lps(self, box: tuple[slice, ...]) -> np.ndarray:
        """(…, 3) LPS positions of the voxels in a box."""
        return self.points_body(box).astype(np.float64) + self.body_centre


def _draw_vessels(hu: np.ndarray, lung: np.ndarray, grid: _Grid, segments) -> None:
    for start, end, radius in segments:
        middle = grid.body_centre + 0.5 * (start + end)
        box = grid.box(middle, 0.5 * float(np.linalg.norm(end - start)) + radius + 1.0)
        if box is None or not lung[box].any():
            continue
        d, _ = _segment_distance(grid.points_body(box), start, end)
        occupied = np.clip(0.5 + (radius - d) / 0.7, 0.0, 1.0) * lung[box]
        hu[box] = hu[box] * (1 - occupied) + BLOOD_HU * occupied


def _place_nodules(config: PhantomConfig, anatomy: _Anatomy, grid: _Grid, rng: np.random.Generator,
                   labels: Sequence[int], segments) -> list[NoduleShape]:
    geometry = grid.geometry
    margin = config.edge_margin_mm / np.asarray(geometry.spacing)
    upper = np.asarray(geometry.size) - 1 - margin
    if np.any(upper <= margin):
        raise MedLoRAError(f"the phantom grid ({geometry.size} voxels of {geometry.spacing} mm) is too small to keep "
                           f"nodules {config.edge_margin_mm} mm from its edges; enlarge size or spacing.")
    big = [(start, end, radius) for start, end, radius in segments if radius > 1.0]
    starts, ends, radii = (np.array([v[n] for v in big]).reshape(len(big), -1) for n in range(3))
    shell = fibonacci_directions(26)
    placed: list[NoduleShape] = []
    for label in labels:
        radius = rng.uniform(*config.diameter_range_mm) / 2.0
        shape = None
        for _ in range(8):  # batches of candidate centres, drawn uniformly inside the margins
            centres = geometry.ijk_to_lps(rng.uniform(margin, upper, (400, 3))) - grid.body_centre
            probes = (centres[:, None, :] + shell * (1.2 * radius + CLEARANCE_MM)).reshape(-1, 3)
            ok = anatomy.inside_lung(*centres.T) & anatomy.inside_lung(*probes.T).reshape(len(centres), -1).all(axis=1)
            if len(big):
                ok &= (_distance_to_segments(centres, starts, ends) >= radius + radii[:, 0] + 1.0).all(axis=1)
            for centre in centres[ok]:
                candidate = _draw_shape(rng, centre + grid.body_centre, 2 * radius, label)
                if all(np.linalg.norm(candidate.centre_lps - other.centre_lps)
                       > candidate.extent_mm + other.extent_mm + CLEARANCE_MM for other in placed):
                    shape = candidate
                    break
            if shape is not None:
                break
        if shape is None:
            raise MedLoRAError(f"could not place {len(labels)} nodules of {config.diameter_range_mm} mm inside the "
                               f"lungs of a {geometry.size} × {geometry.spacing} mm phantom; use fewer nodules, smaller "
                               "diameters or a larger grid.")
        placed.append(shape)
    return placed


def _draw_nodule(hu: np.ndarray, grid: _Grid, shape: NoduleShape, rng: np.random.Generator, mix: NoduleMix) -> None:
    box = grid.box(shape.centre_lps, shape.extent_mm + 1.0)
    points = grid.points_lps(box)
    background = hu[box].astype(np.float64)
    _compose(shape, rng, mix)
    occupied, core = shape.occupancy(points)
    hu[box] = (background * (1 - occupied) + shape.density(core) * occupied).astype(np.float32)


def _scanner(hu: np.ndarray, spacing: tuple[float, float, float], noise_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Blur by the point-spread function (and slice profile), add correlated noise, store as int16."""
    sigma_kji = [max(0.6 / s, 0.42) for s in reversed(spacing)]
    if noise_hu > 0:
        white = rng.standard_normal(hu.shape, dtype=np.float32)
        hu += white * np.float32(noise_hu / _noise_gain(sigma_kji))
    blurred = ndimage.gaussian_filter(hu, sigma_kji, mode="nearest", truncate=3.0)
    return np.clip(np.rint(blurred), MIN_STORED_HU, MAX_STORED_HU).astype(np.int16)


def _noise_gain(sigmas: Sequence[float]) -> float:
    """How much a Gaussian filter shrinks the standard deviation of white noise."""
    gain = 1.0
    for sigma in sigmas:
        radius = int(3.0 * sigma + 0.5)
        weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        weights /= weights.sum()
        gain *= float(np.sqrt((weights ** 2).sum()))
    return gain


def _balanced_labels(n: int, malignant_fraction: float, rng: np.random.Generator) -> list[int]:
    n_malignant = int(round(n * malignant_fraction))
    labels = np.array([1] * n_malignant + [0] * (n - n_malignant))
    rng.shuffle(labels)
    return labels.tolist()


def make_phantom(config: PhantomConfig | None = None, seed: int | None = None, *, case_id: str = "PHANTOM",
                 labels: Sequence[int] | None = None) -> tuple[CTImage, list[Nodule]]:
    """A synthetic chest CT and its nodules (deterministic for a seed).

    Args:
        config: grid and content; defaults to ``PhantomConfig()``.
        seed: overrides ``config.seed``.
        case_id: patient id written into the image ids and the nodule records.
        labels: the nodules' labels (0/1) in order; by default ``config.n_nodules`` with
            ``malignant_fraction`` malignant, in random order.
    """
    return _make(config or PhantomConfig(), seed, case_id, labels)[:2]


def _make(config: PhantomConfig, seed: int | None, case_id: str,
          labels: Sequence[int] | None) -> tuple[CTImage, list[Nodule], list[NoduleShape]]:
    from pydicom.uid import generate_uid

    seed = config.seed if seed is None else int(seed)
    rng = np.random.default_rng(seed)
    geometry = config.geometry()
    body_centre = geometry.ijk_to_lps((np.asarray(geometry.size) - 1) / 2.0)
    anatomy = _Anatomy.for_field_of_view(np.asarray(geometry.size) * np.asarray(geometry.spacing), rng)
    grid = _Grid(geometry, body_centre)
    hu, lung = _body_hu(anatomy, *grid.coords, rng, config.ribs)
    segments = _vessel_tree(anatomy, rng) if config.vessels else []
    _draw_vessels(hu, lung, grid, segments)
    labels = list(labels) if labels is not None else _balanced_labels(config.n_nodules, config.malignant_fraction, rng)
    if any(label not in (0, 1) for label in labels):
        raise MedLoRAError(f"nodule labels must be 0 or 1, got {labels}")
    shapes = _place_nodules(config, anatomy, grid, rng, labels, segments)
    for shape in shapes:
        _draw_nodule(hu, grid, shape, rng, config.mix)
    voxels = _scanner(hu, geometry.spacing, config.noise_hu, rng)
    ids = StudyIds(patient_id=case_id, study_uid=generate_uid(entropy_srcs=[case_id, str(seed), "study"]),
                   series_uid=generate_uid(entropy_srcs=[case_id, str(seed), "series"]))
    image = CTImage(voxels_hu=voxels, geometry=geometry, ids=ids, source=f"phantom:{case_id}:seed={seed}")
    nodules = [Nodule(centre_lps=tuple(shape.centre_lps), nodule_id=f"{case_id}/n{n + 1}", case_id=case_id,
                      series_uid=ids.series_uid, diameter_mm=round(2 * shape.radius, 3), label=shape.label,
                      source="phantom") for n, shape in enumerate(shapes)]
    log.debug("phantom %s: %s", case_id, ", ".join(f"{s.kind} {2 * s.radius:.1f} mm" for s in shapes))
    return image, nodules, shapes


# --------------------------------------------------------------------------------------------
# Shortcut check and a shape measure
# --------------------------------------------------------------------------------------------
def _sphere_mean(image: CTImage, centre_lps: np.ndarray, radius: float) -> float:
    geometry = image.geometry
    ijk = geometry.lps_to_ijk(centre_lps)
    half = radius / np.asarray(geometry.spacing)
    low = np.maximum(np.floor(ijk - half).astype(int), 0)
    high = np.minimum(np.ceil(ijk + half).astype(int) + 1, geometry.size)
    if np.any(high <= low):
        raise MedLoRAError(f"nodule at LPS {np.round(centre_lps, 1).tolist()} mm lies outside the image")
    i, j, k = np.meshgrid(*(np.arange(lo, hi) for lo, hi in zip(low, high)), indexing="ij")
    points = geometry.ijk_to_lps(np.stack([i, j, k], axis=-1).reshape(-1, 3))
    values = image.voxels_hu[k.ravel(), j.ravel(), i.ravel()].astype(np.float64)
    dist = np.linalg.norm(points - centre_lps, axis=1)
    inside = dist <= radius
    return float(values[inside].mean() if inside.any() else values[np.argmin(dist)])


def shortcut_features(image: CTImage, nodules: Sequence[Nodule]) -> np.ndarray:
    """(N, 2): each nodule's diameter (mm) and mean HU inside a sphere of its radius.

    A classifier that only sees these two numbers is the shortcut baseline every AUC is
    reported beside.
    """
    rows = []
    for nodule in nodules:
        if nodule.diameter_mm is None or nodule.diameter_mm <= 0:
            raise MedLoRAError(f"nodule {nodule.nodule_id or '(unnamed)'} has no diameter; the shortcut features "
                               "need diameter_mm.")
        rows.append((float(nodule.diameter_mm),
                     _sphere_mean(image, np.asarray(nodule.centre_lps), nodule.diameter_mm / 2.0)))
    return np.asarray(rows, dtype=float).reshape(-1, 2)


def shortcut_auc(features: np.ndarray, labels: Sequence[int], folds: int = 5, seed: int = 0) -> float:
    """ROC AUC of a logistic regression on the shortcut features (cross-validated, out-of-fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels, dtype=int)
    x = np.asarray(features, dtype=float)
    if len(np.unique(y)) < 2 or np.bincount(y).min() < folds:
        raise MedLoRAError(f"the shortcut baseline needs at least {folds} nodules of each class, got {np.bincount(y, minlength=2).tolist()}")
    model = make_pipeline(StandardScaler(), LogisticRegression())
    scores = cross_val_predict(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                               method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def margin_irregularity(image: CTImage, nodule: Nodule, n_rays: int = 300) -> float:
    """Coefficient of variation of the nodule's boundary radius over many rays from its centre.

    The boundary along a ray is where HU first drops below halfway between the nodule's
    centre and the surrounding lung. Smooth round nodules score low; lobulated and
    spiculated ones high.
    """
    if nodule.diameter_mm is None:
        raise MedLoRAError(f"nodule {nodule.nodule_id or '(unnamed)'} needs diameter_mm for margin_irregularity")
    radius = nodule.diameter_mm / 2.0
    centre = np.asarray(nodule.centre_lps, dtype=float)
    steps = np.arange(0.0, 2.5 * radius + 3.0, 0.25)
    rays = fibonacci_directions(n_rays)
    points = centre + rays[:, None, :] * steps[None, :, None]
    ijk = image.geometry.lps_to_ijk(points.reshape(-1, 3))
    values = ndimage.map_coordinates(image.voxels_hu.astype(np.float32), ijk[:, ::-1].T, order=1,
                                     mode="nearest").reshape(len(rays), len(steps))
    inner = np.median(values[:, steps <= max(radius / 3.0, 1.0)])
    outer = np.median(values[:, steps >= 2.0 * radius])
    below = values < 0.5 * (inner + outer)
    boundary = np.where(below.any(axis=1), steps[np.argmax(below, axis=1)], steps[-1])
    return float(boundary.std() / max(boundary.mean(), 1e-6))


# --------------------------------------------------------------------------------------------
# Writing: DICOM series and training cohorts
# --------------------------------------------------------------------------------------------
def _stored_pixels(voxels_hu: np.ndarray) -> tuple[np.ndarray, int]:
    """Stored values and PixelRepresentation for intercept -1024, slope 1 (as scanners do)."""
    if not np.issubdtype(voxels_hu.dtype, np.integer):
        if not np.array_equal(voxels_hu, np.round(voxels_hu)):
            raise MedLoRAError("DICOM CT stores whole Hounsfield units, but this image has fractional values "
                               "(e.g. after resampling). Round it first, or save it as NRRD/NIfTI instead.")
    lo, hi = int(voxels_hu.min()), int(voxels_hu.max())
    if lo >= -1024 and hi <= 65535 - 1024:
        return (voxels_hu.astype(np.int32) + 1024).astype(np.uint16), 0
    if lo >= -32768 - 1024 and hi <= 32767 - 1024:
        return (voxels_hu.astype(np.int32) + 1024).astype(np.int16), 1
    raise MedLoRAError(f"HU range {lo}…{hi} does not fit 16-bit DICOM pixels; save the image as NRRD/NIfTI instead.")


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value) + 0.0)


def write_dicom_series(image: CTImage, folder: str | os.PathLike, *, patient_id: str = "PHANTOM",
                       study_uid: str | None = None, series_uid: str | None = None, modality: str = "CT",
                       overwrite: bool = False) -> Path:
    """Write ``image`` as a DICOM series, one file per slice, into ``folder`` (created atomically).

    Geometry goes into ImagePositionPatient / ImageOrientationPatient / PixelSpacing, voxels as
    16-bit stored values with RescaleIntercept -1024 and slope 1, so ``load_ct`` reads back the
    same voxels and grid. UIDs default to the image's own ids, else fresh ones.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise MedLoRAError(f"{folder} already holds files; choose an empty folder or pass overwrite=True.")
    stored, representation = _stored_pixels(image.voxels_hu)
    geometry = image.geometry
    study_uid = study_uid or image.ids.study_uid or generate_uid()
    series_uid = series_uid or image.ids.series_uid or generate_uid()
    frame_uid = generate_uid(entropy_srcs=[series_uid, "frame"])
    row_dir, col_dir, slice_dir = geometry.direction.T
    spacing_i, spacing_j, spacing_k = geometry.spacing
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    make_dir_public(staging)
    try:
        for k in range(geometry.size[2]):
            sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)])
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            ds.preamble = b"\0" * 128
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.PatientID, ds.PatientName = patient_id, patient_id
            ds.Modality, ds.ImageType = modality, ["DERIVED", "SECONDARY", "AXIAL"]
            ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
            ds.SeriesDescription = "MedLoRA synthetic chest CT"
            ds.ImagePositionPatient = [_ds(v) for v in geometry.ijk_to_lps(np.array([0.0, 0.0, k]))]
            ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
            ds.PixelSpacing = [_ds(spacing_j), _ds(spacing_i)]  # between rows, between columns
            ds.SliceThickness = _ds(spacing_k)
            ds.SpacingBetweenSlices = _ds(spacing_k)
            ds.Rows, ds.Columns = geometry.size[1], geometry.size[0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, representation
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
            ds.WindowCenter, ds.WindowWidth = "-600", "1500"
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            ds.save_as(staging / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
        replace_dir(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


MANIFEST_COLUMNS = ("image", "x", "y", "z", "coordinate_system", "label", "patient_id", "nodule_id", "diameter_mm")


def write_cohort(out_dir: str | os.PathLike, n_cases: int, seed: int = 0, *, config: PhantomConfig | None = None,
                 fmt: Literal["nrrd", "dicom"] = "nrrd") -> Path:
    """Write ``n_cases`` phantoms (patients SYN-0001 …) and a training manifest; return its path.

    Labels are balanced over the whole cohort (half malignant, rounded down). The manifest
    (``manifest.csv``: image relative to it, LPS centres, label, ids, diameter) is written last,
    so its presence means the cohort is complete.
    """
    if n_cases < 1:
        raise MedLoRAError(f"a cohort needs at least one case, got {n_cases}")
    if fmt not in ("nrrd", "dicom"):
        raise MedLoRAError(f"unknown cohort format {fmt!r}: use 'nrrd' or 'dicom'")
    from .ctio import save_volume

    config = config or PhantomConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    streams = np.random.SeedSequence(seed).spawn(n_cases + 1)
    label_rng = np.random.default_rng(streams[0])
    total = n_cases * config.n_nodules
    labels = np.array([1] * (total // 2) + [0] * (total - total // 2))
    label_rng.shuffle(labels)
    rows = []
    for case in range(n_cases):
        case_id = f"SYN-{case + 1:04d}"
        case_seed = int(np.random.default_rng(streams[case + 1]).integers(2**31))
        case_labels = labels[case * config.n_nodules:(case + 1) * config.n_nodules]
        image, nodules = make_phantom(replace(config, seed=case_seed), case_id=case_id, labels=case_labels)
        if fmt == "nrrd":
            relative = f"{case_id}.nrrd"
            save_volume(image, out / relative)
        else:
            relative = case_id
            write_dicom_series(image, out / relative, patient_id=case_id, overwrite=True)
        for nodule in nodules:
            x, y, z = nodule.centre_lps
            rows.append({"image": relative, "x": f"{x:.4f}", "y": f"{y:.4f}", "z": f"{z:.4f}",
                         "coordinate_system": "LPS", "label": nodule.label, "patient_id": case_id,
                         "nodule_id": nodule.nodule_id, "diameter_mm": f"{nodule.diameter_mm:.2f}"})
    manifest = out / "manifest.csv"
    with atomic_path(manifest) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest
