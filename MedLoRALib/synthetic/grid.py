"""Where every voxel centre lies in the world, for drawing anatomy in millimetres on any grid."""

from __future__ import annotations

import numpy as np

from ..geometry import Geometry


def voxel_box(geometry: Geometry, centre_lps: np.ndarray, radius_mm: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Lowest and one-past-highest (i, j, k) of the voxels a ball may touch, or None if it misses the grid."""
    ijk = geometry.lps_to_ijk(centre_lps)
    half = radius_mm / np.asarray(geometry.spacing)
    low = np.maximum(np.floor(ijk - half).astype(int), 0)
    high = np.minimum(np.ceil(ijk + half).astype(int) + 1, geometry.size)
    return None if np.any(high <= low) else (low, high)


class Grid:
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
        bounds = voxel_box(self.geometry, centre_lps, radius_mm)
        if bounds is None:
            return None
        return tuple(slice(lo, hi) for lo, hi in zip(bounds[0][::-1], bounds[1][::-1]))

    def points_body(self, box: tuple[slice, ...]) -> np.ndarray:
        """(…, 3) float32 positions of the voxels in a box, in mm from the body centre."""
        return np.stack([c[box] for c in self.coords], axis=-1)

    def points_lps(self, box: tuple[slice, ...]) -> np.ndarray:
        """(…, 3) LPS positions of the voxels in a box."""
        return self.points_body(box).astype(np.float64) + self.body_centre
