"""Synthetic nodules: benign-like and malignant-like shapes and compositions, placed in the lungs.

* benign-like (label 0): smooth ovoids with sharp margins; some calcified (central or popcorn),
  some uniformly ground-glass;
* malignant-like (label 1): lobulated or spiculated outlines with softer margins; some part-solid
  (ground-glass with an irregular solid core).

Both classes draw their diameter from one range and their solid tissue from one density range
(``NoduleMix``), so shape, not size or density, tells them apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..errors import MedLoRAError
from .config import NoduleMix, PhantomConfig
from .grid import Grid
from .shapes import distance_to_segments, fibonacci_directions, random_rotation, random_units, segment_distance

if TYPE_CHECKING:
    from .anatomy import Anatomy

CLEARANCE_MM = 3.0  # lung tissue kept around every nodule (and between nodules)
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
            d, t = segment_distance(local.reshape(-1, 3)[near], start, end)
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
    rotation = random_rotation(rng)
    if label == 0:
        axes = rng.uniform(0.75, 1.3, 3)
        return NoduleShape(centre_lps=centre_lps, radius=radius, label=0, rotation=rotation, kind="solid",
                           axes=axes / np.cbrt(axes.prod()), edge_mm=rng.uniform(0.25, 0.45))
    kind: NoduleKind = "spiculated" if rng.random() < 0.5 else "lobulated"
    lobulated = kind == "lobulated"
    shape = NoduleShape(centre_lps=centre_lps, radius=radius, label=1, rotation=rotation, kind=kind,
                        bumps=random_units(rng, int(rng.integers(5, 10))),
                        bump_amplitude=rng.uniform(0.6, 1.0) if lobulated else rng.uniform(0.25, 0.45),
                        bump_sharpness=rng.uniform(7.0, 14.0), edge_mm=rng.uniform(0.6, 1.1))
    if kind == "spiculated":
        for direction in random_units(rng, int(rng.integers(8, 20))):
            surface = float(shape.outline_radius(direction[None])[0])
            length = rng.uniform(0.6, 1.4) * radius + 3.0
            shape.spicules.append((direction * 0.8 * surface, direction * (surface + length),
                                   rng.uniform(0.8, 1.3), rng.uniform(0.3, 0.5)))
    return shape



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
        offsets = random_units(rng, n_blobs) * rng.uniform(0.2, 0.5) * shape.radius
        shape.core_centres = offsets if popcorn else np.zeros((1, 3))
        shape.core_size = float(rng.uniform(0.15, 0.3) if popcorn else rng.uniform(0.2, 0.5)) * shape.radius
    elif draw < mix.benign_calcified + mix.benign_ground_glass:
        shape.kind, shape.base_hu = "ground-glass", float(rng.uniform(*mix.ground_glass_hu))
        shape.core_hu = shape.base_hu



def balanced_labels(n: int, malignant_fraction: float, rng: np.random.Generator) -> list[int]:
    n_malignant = int(round(n * malignant_fraction))
    labels = np.array([1] * n_malignant + [0] * (n - n_malignant))
    rng.shuffle(labels)
    return labels.tolist()


def place_nodules(config: PhantomConfig, anatomy: Anatomy, grid: Grid, rng: np.random.Generator,
                   labels: Sequence[int], segments) -> list[NoduleShape]:
    geometry = grid.geometry
    margin = config.edge_margin_mm / np.asarray(geometry.spacing)
    upper = np.asarray(geometry.size) - 1 - margin
    if np.any(upper <= margin):
        raise MedLoRAError(f"the phantom grid ({geometry.size} voxels of {geometry.spacing} mm) is too small to keep "
                           f"nodules {config.edge_margin_mm} mm from its edges; enlarge size or spacing.")
    big = [(start, end, radius) for start, end, radius in segments if radius > 1.0]
    starts = np.array([start for start, _, _ in big], dtype=float).reshape(-1, 3)  # (0, 3) without vessels
    ends = np.array([end for _, end, _ in big], dtype=float).reshape(-1, 3)
    radii = np.array([radius for _, _, radius in big], dtype=float).reshape(-1, 1)
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
                ok &= (distance_to_segments(centres, starts, ends) >= radius + radii[:, 0] + 1.0).all(axis=1)
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


def draw_nodule(hu: np.ndarray, grid: Grid, shape: NoduleShape, rng: np.random.Generator, mix: NoduleMix) -> None:
    box = grid.box(shape.centre_lps, shape.extent_mm + 1.0)
    points = grid.points_lps(box)
    background = hu[box].astype(np.float64)
    _compose(shape, rng, mix)
    occupied, core = shape.occupancy(points)
    hu[box] = (background * (1 - occupied) + shape.density(core) * occupied).astype(np.float32)
