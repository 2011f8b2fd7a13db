"""What a phantom holds: its grid, how many nodules, and the densities both classes share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import MedLoRAError
from ..geometry import Geometry


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
