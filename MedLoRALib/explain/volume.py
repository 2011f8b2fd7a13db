"""Saliency on a nodule's planes, put back into the CT's own grid as a volume (torch-free).

A 2D view set shows the model a few planes through the nodule (``patches.PLANE_AXES``:
columns along ``u``, rows along ``w``, both in LPS). A saliency map on plane ``v`` is a
grid of cells over the same field of view: cell ``(r, c)`` covers ``cell_px`` × ``cell_px``
patch pixels (1 for pixel maps such as gradient × input, the ViT patch size for token
maps such as attention rollout). Mapping back goes the other way round, once per voxel
of the output grid: the voxel's LPS position is projected onto each plane and the map is
read there with one bilinear interpolation. A voxel takes the mean of the planes whose slab
(half a voxel either side of the plane, measured along its normal) contains it; voxels no
plane passes through are 0 — the model never saw them. A ``cube`` map is resampled
trilinearly from the cube's own grid (``patches.cube_geometry``).

The output grid is the CT's own: the same spacing and direction, either the whole volume
or the block of its voxels around the nodule (origin on a CT voxel), so the overlay lines
up with the CT voxel for voxel. NRRD files store the grid in LPS (``space: left-posterior-
superior``), as SimpleITK writes them; Slicer shows them in RAS without any extra step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..atomic import atomic_path
from ..errors import MedLoRAError, PatchError
from ..geometry import Geometry
from ..image import CTImage
from ..patches import PLANE_AXES, PatchSpec, check_inside, cube_geometry

METHODS = ("rollout", "gradxinput")
#: NRRD key/value fields MedLoRA writes; their presence marks a file as MedLoRA's own.
NRRD_MARK = "MedLoRA_explanation"


@dataclass
class SaliencyVolume:
    """A saliency map on a grid of the CT (voxels ``[k, j, i]``, grid in LPS mm).

    Args:
        values: float32 saliency, ``[k, j, i]``; 0 where no plane the model read passes.
        geometry: the grid (the CT's spacing and direction).
        method: ``rollout`` or ``gradxinput``.
        centre_lps: the nodule centre the patches were cut around.
        covered: True where at least one plane passes (the model saw this voxel).
        info: extra NRRD fields (adapter, nodule id, ...), written as ``MedLoRA_*`` keys.
    """

    values: np.ndarray
    geometry: Geometry
    method: str
    centre_lps: tuple[float, float, float]
    covered: np.ndarray
    info: dict = field(default_factory=dict)

    def peak_lps(self) -> np.ndarray:
        """LPS position (mm) of the voxel with the largest value."""
        k, j, i = np.unravel_index(int(np.argmax(self.values)), self.values.shape)
        return self.geometry.ijk_to_lps(np.array([i, j, k], dtype=float))

    def to_sitk(self):
        """A SimpleITK float32 image on this grid, with the MedLoRA fields as metadata."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.values, dtype=np.float32))
        self.geometry.apply_to_sitk(image)
        image.SetMetaData(NRRD_MARK, self.method)
        image.SetMetaData("MedLoRA_centre_lps", " ".join(f"{v:.4f}" for v in self.centre_lps))
        for key, value in self.info.items():
            image.SetMetaData(f"MedLoRA_{key}", str(value))
        return image


# --- grids -------------------------------------------------------------------------------------

def _plane_axes(spec: PatchSpec) -> np.ndarray:
    """(V, 2, 3): the (column u, row w) unit vectors of each plane in LPS."""
    return np.array([PLANE_AXES[name] for name in spec.planes], dtype=float)


def nodule_grid(ct: Geometry, centre_lps, spec: PatchSpec) -> Geometry:
    """The block of the CT's voxels that holds every sample of the nodule's patch (one voxel margin).

    Same spacing and direction as ``ct``; its origin is a CT voxel centre, so the block
    lines up with the CT exactly. Clipped to the CT.
    """
    centre = np.asarray(centre_lps, dtype=float).reshape(3)
    half = spec.fov_mm / 2.0
    if spec.views == "cube":
        signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], dtype=float)
        corners = centre + half * signs
    else:
        axes = _plane_axes(spec)
        corners = np.concatenate([centre + half * (a * u + b * w) for u, w in axes
                                  for a in (-1, 1) for b in (-1, 1)]).reshape(-1, 3)
    ijk = ct.lps_to_ijk(corners)
    size = np.asarray(ct.size)
    low = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 1, 0, size - 1)
    high = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 1, 0, size - 1)
    return Geometry(size=tuple(high - low + 1), spacing=ct.spacing, origin_lps=tuple(ct.ijk_to_lps(low)),
                    direction=ct.direction)


def _voxel_positions_lps(grid: Geometry) -> np.ndarray:
    """LPS position of every voxel of ``grid``, (K·J·I, 3) in ``[k, j, i]`` order."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in reversed(grid.size)), indexing="ij")
    return grid.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=-1).astype(float))


def _half_thickness_mm(grid: Geometry, normal: np.ndarray) -> float:
    """Half a voxel's extent along ``normal``: every point of the plane has a voxel within it."""
    return 0.5 * float(np.sum(np.abs(normal @ grid.direction) * np.asarray(grid.spacing)))


# --- mapping -----------------------------------------------------------------------------------

def _check_maps(maps: np.ndarray, spec: PatchSpec, cell_px: int) -> np.ndarray:
    array = np.asarray(maps, dtype=np.float32)
    if spec.views == "cube":
        if array.ndim != 3 or len(set(array.shape)) != 1:
            raise PatchError(f"a cube saliency map must be (n, n, n), got {array.shape}")
        return array
    if array.ndim != 3 or array.shape[0] != len(spec.planes):
        raise PatchError(f"saliency maps must be ({len(spec.planes)} planes, rows, columns) for view set "
                         f"{spec.views!r}, got {array.shape}")
    if cell_px < 1 or max(array.shape[1:]) * cell_px > spec.pixels:
        raise PatchError(f"{array.shape[1]}×{array.shape[2]} cells of {cell_px} px do not fit a "
                         f"{spec.pixels} px patch")
    if not np.isfinite(array).all():
        raise PatchError("saliency maps contain NaN or infinite values")
    return array


def map_to_grid(maps: np.ndarray, centre_lps, spec: PatchSpec, grid: Geometry, cell_px: int = 1,
                method: str = "", info: dict | None = None) -> SaliencyVolume:
    """Put one nodule's saliency maps into ``grid`` with one interpolation (see the module doc).

    Args:
        maps: (planes, rows, columns) in the patch's own plane order and orientation, or a
            (n, n, n) cube map in the cube's ``[z, y, x]`` order.
        centre_lps: the centre the patch was cut around (LPS mm).
        spec: the adapter's patch spec the maps were computed on.
        grid: the output grid (``nodule_grid`` or the CT's own geometry).
        cell_px: patch pixels per map cell along rows and columns (ViT patch size for token maps).
    """
    array = _check_maps(maps, spec, cell_px)
    centre = np.asarray(centre_lps, dtype=float).reshape(3)
    points = _voxel_positions_lps(grid)
    shape = tuple(reversed(grid.size))
    if spec.views == "cube":
        cube = cube_geometry(centre, PatchSpec(views="cube", fov_mm=spec.fov_mm, pixels=array.shape[0],
                                               window_hu=spec.window_hu, normalisation=spec.normalisation))
        ijk = cube.lps_to_ijk(points)
        inside = np.all((ijk >= -0.5) & (ijk <= array.shape[0] - 0.5), axis=-1)
        values = ndimage.map_coordinates(array, ijk[:, ::-1].T, order=1, mode="nearest")
        values = np.where(inside, values, 0.0)
        return SaliencyVolume(values.reshape(shape).astype(np.float32), grid, method, tuple(centre),
                              inside.reshape(shape), dict(info or {}))
    total = np.zeros(len(points))
    count = np.zeros(len(points), dtype=np.int32)
    relative = points - centre
    for plane, (u, w) in zip(array, _plane_axes(spec)):
        normal = np.cross(u, w)
        near = np.abs(relative @ normal) <= _half_thickness_mm(grid, normal) + 1e-9
        # LPS → patch pixel (column, row) → map cell: pixel p has its centre at (p - (P-1)/2) · pixel_mm
        pixel_col = relative[near] @ u / spec.pixel_mm + (spec.pixels - 1) / 2.0
        pixel_row = relative[near] @ w / spec.pixel_mm + (spec.pixels - 1) / 2.0
        cell = np.stack([(pixel_row - (cell_px - 1) / 2.0) / cell_px, (pixel_col - (cell_px - 1) / 2.0) / cell_px])
        rows, cols = plane.shape
        on_map = (cell[0] >= -0.5) & (cell[0] <= rows - 0.5) & (cell[1] >= -0.5) & (cell[1] <= cols - 0.5)
        index = np.flatnonzero(near)[on_map]
        total[index] += ndimage.map_coordinates(plane, cell[:, on_map], order=1, mode="nearest")
        count[index] += 1
    values = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return SaliencyVolume(values.reshape(shape).astype(np.float32), grid, method, tuple(centre),
                          (count > 0).reshape(shape), dict(info or {}))


def saliency_volume(maps: np.ndarray, image: CTImage, centre_lps, spec: PatchSpec, cell_px: int = 1,
                    method: str = "", full_grid: bool = False, info: dict | None = None) -> SaliencyVolume:
    """One nodule's maps on the CT's grid: the block around the nodule, or the whole CT (``full_grid``).

    A centre outside the CT is refused with a ``PatchError`` naming the point and the volume's extent.
    """
    centre = np.asarray(centre_lps, dtype=float).reshape(1, 3)
    if not np.isfinite(centre).all():
        raise PatchError(f"nodule centre {centre[0].tolist()} is not a finite LPS point")
    check_inside(image, centre)
    block = nodule_grid(image.geometry, centre[0], spec)
    volume = map_to_grid(maps, centre[0], spec, block, cell_px, method, info)
    if not full_grid:
        return volume
    full = np.zeros(tuple(reversed(image.geometry.size)), dtype=np.float32)
    covered = np.zeros(full.shape, dtype=bool)
    i0, j0, k0 = np.rint(image.geometry.lps_to_ijk(block.origin_lps)).astype(int)
    ni, nj, nk = block.size
    full[k0:k0 + nk, j0:j0 + nj, i0:i0 + ni] = volume.values
    covered[k0:k0 + nk, j0:j0 + nj, i0:i0 + ni] = volume.covered
    return SaliencyVolume(full, image.geometry, method, volume.centre_lps, covered, volume.info)


# --- files -------------------------------------------------------------------------------------

def is_medlora_explanation(path: str | os.PathLike) -> bool:
    """True when ``path`` is a volume file MedLoRA wrote as an explanation (its header says so)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return NRRD_MARK in reader.GetMetaDataKeys()


def save_saliency(volume: SaliencyVolume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the volume as NRRD (LPS grid, float32), atomically.

    An existing file is replaced only with ``overwrite`` and only when MedLoRA wrote it.
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.suffix.lower() != ".nrrd":
        raise MedLoRAError(f"cannot save an explanation as {path.name}: use a .nrrd file name")
    if path.exists():
        if not overwrite:
            raise MedLoRAError(f"{path} exists: choose another output folder or pass --overwrite")
        if not is_medlora_explanation(path):
            raise MedLoRAError(f"{path} exists and was not written by medlora explain: MedLoRA does not "
                               "overwrite it; choose another output folder")
    with atomic_path(path) as tmp:
        sitk.WriteImage(volume.to_sitk(), str(tmp), True)
    return path


def rank_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation of two maps of the same shape (the model-randomisation check)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(first, dtype=float).ravel(), np.asarray(second, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {np.shape(first)} vs {np.shape(second)}")
    rho = float(spearmanr(a, b)[0])
    return rho if math.isfinite(rho) else 0.0  # a constant map has no ranks to correlate
