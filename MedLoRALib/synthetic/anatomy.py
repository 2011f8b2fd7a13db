"""Chest anatomy in the body frame (millimetres from the body centre along LPS x, y, z).

Body, fat, ribs, sternum, spine, heart, two lungs with gravity-dependent density and
branching pulmonary vessels, scaled to the field of view with a little per-case variation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grid import Grid
from .shapes import fibonacci_directions, segment_distance

LUNG_HU = -860.0
SOFT_TISSUE_HU = 40.0
FAT_HU = -95.0
BLOOD_HU = 40.0
BONE_HU = 450.0
CORTICAL_HU = 750.0
AIR_HU = -1000.0


@dataclass(frozen=True)
class Anatomy:
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
    def for_field_of_view(cls, fov_mm: np.ndarray, rng: np.random.Generator) -> Anatomy:
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


def body_hu(anatomy: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray, rng: np.random.Generator,
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



def vessel_tree(anatomy: Anatomy, rng: np.random.Generator, depth: int = 4,
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



def draw_vessels(hu: np.ndarray, lung: np.ndarray, grid: Grid, segments) -> None:
    for start, end, radius in segments:
        middle = grid.body_centre + 0.5 * (start + end)
        box = grid.box(middle, 0.5 * float(np.linalg.norm(end - start)) + radius + 1.0)
        if box is None or not lung[box].any():
            continue
        d, _ = segment_distance(grid.points_body(box), start, end)
        occupied = np.clip(0.5 + (radius - d) / 0.7, 0.0, 1.0) * lung[box]
        hu[box] = hu[box] * (1 - occupied) + BLOOD_HU * occupied
