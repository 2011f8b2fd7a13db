"""Where voxels are in the patient: LPS vs RAS, voxel index vs world millimetres.

Conventions used throughout MedLoRA (and in every name that carries a coordinate):

* ``*_lps`` — world millimetres in DICOM/ITK patient coordinates: +x Left, +y Posterior,
  +z Superior. This is what SimpleITK and DICOM use, and MedLoRA's internal frame.
* ``*_ras`` — world millimetres as 3D Slicer shows them: +x Right, +y Anterior,
  +z Superior. RAS = diag(-1, -1, 1) · LPS, and the same map takes RAS back to LPS.
* ``ijk`` — continuous voxel index (i = column, j = row, k = slice); voxel centres
  are at integer ijk. Voxel arrays are stored in ``[k, j, i]`` order, as SimpleITK's
  ``GetArrayFromImage`` and Slicer's ``arrayFromVolume`` return them.
* ``direction`` — 3×3 matrix whose columns are the unit vectors of the i, j, k axes in
  LPS (SimpleITK's direction, reshaped row-major).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
RAS_FROM_LPS = LPS_FROM_RAS  # the flip is its own inverse


def ras_to_lps(points_ras: np.ndarray) -> np.ndarray:
    """Convert points (…, 3) from RAS to LPS millimetres."""
    return np.asarray(points_ras, dtype=float) @ LPS_FROM_RAS.T


def lps_to_ras(points_lps: np.ndarray) -> np.ndarray:
    """Convert points (…, 3) from LPS to RAS millimetres."""
    return np.asarray(points_lps, dtype=float) @ RAS_FROM_LPS.T


def to_lps(points: np.ndarray, coordinate_system: str) -> np.ndarray:
    """Bring points given in ``coordinate_system`` ("LPS" or "RAS") into LPS."""
    system = coordinate_system.strip().upper()
    if system == "LPS":
        return np.asarray(points, dtype=float)
    if system == "RAS":
        return ras_to_lps(points)
    raise ValueError(f"unknown coordinate system {coordinate_system!r}: use 'LPS' or 'RAS'")


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of a volume in LPS millimetres.

    Args:
        size: number of voxels along (i, j, k).
        spacing: voxel size in mm along (i, j, k).
        origin_lps: LPS position of the centre of voxel (0, 0, 0).
        direction: 3×3, columns are the i, j, k axis directions in LPS.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin_lps", tuple(float(v) for v in self.origin_lps))
        direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if min(self.spacing) <= 0:
            raise ValueError(f"voxel spacing must be positive, got {self.spacing}")
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            # a sheared or scaled "direction" would put every voxel in the wrong place
            raise ValueError(f"direction matrix is not orthonormal: {direction.tolist()}")
        direction.setflags(write=False)
        object.__setattr__(self, "direction", direction)

    # --- matrices -------------------------------------------------------------------
    @property
    def lps_from_ijk(self) -> np.ndarray:
        """4×4 homogeneous matrix: LPS = M · (i, j, k, 1)."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin_lps
        return m

    @property
    def ras_from_ijk(self) -> np.ndarray:
        """4×4 homogeneous matrix: RAS = M · (i, j, k, 1) — Slicer's IJKToRAS."""
        flip = np.eye(4)
        flip[:3, :3] = RAS_FROM_LPS
        return flip @ self.lps_from_ijk

    @classmethod
    def from_ras_from_ijk(cls, ras_from_ijk: np.ndarray, size: tuple[int, int, int]) -> Geometry:
        """Build from Slicer's IJKToRAS matrix and the volume's (i, j, k) size."""
        m = np.asarray(ras_from_ijk, dtype=float)
        lps = RAS_FROM_LPS @ m[:3, :4]
        linear = lps[:, :3]
        spacing = np.linalg.norm(linear, axis=0)
        return cls(size=size, spacing=tuple(spacing), origin_lps=tuple(lps[:, 3]),
                   direction=linear / spacing)

    # --- point maps -------------------------------------------------------------------
    def ijk_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous voxel index (…, 3) → LPS mm (…, 3)."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin_lps)

    def lps_to_ijk(self, points_lps: np.ndarray) -> np.ndarray:
        """LPS mm (…, 3) → continuous voxel index (…, 3)."""
        rel = np.asarray(points_lps, dtype=float) - np.asarray(self.origin_lps)
        # direction is orthonormal: its inverse is its transpose.
        return (rel @ self.direction) / np.asarray(self.spacing)

    def contains_lps(self, points_lps: np.ndarray, margin_voxels: float = 0.5) -> np.ndarray:
        """True for each point that lies inside the voxel grid (half a voxel of slack)."""
        ijk = self.lps_to_ijk(np.atleast_2d(points_lps))
        upper = np.asarray(self.size) - 1 + margin_voxels
        return np.all((ijk >= -margin_voxels) & (ijk <= upper), axis=-1)

    @property
    def extent_lps(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS bounding box (min, max) of the voxel centres."""
        corners = np.array([[i, j, k] for i in (0, self.size[0] - 1)
                            for j in (0, self.size[1] - 1) for k in (0, self.size[2] - 1)])
        world = self.ijk_to_lps(corners)
        return world.min(axis=0), world.max(axis=0)

    # --- SimpleITK ----------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image) -> Geometry:
        """Read the grid of a SimpleITK image (which is LPS by definition)."""
        return cls(size=image.GetSize(), spacing=image.GetSpacing(), origin_lps=image.GetOrigin(),
                   direction=np.asarray(image.GetDirection()).reshape(3, 3))

    def apply_to_sitk(self, image) -> None:
        """Stamp this grid onto a SimpleITK image of the same size."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} does not match geometry {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin_lps)
        image.SetDirection(tuple(self.direction.ravel()))
