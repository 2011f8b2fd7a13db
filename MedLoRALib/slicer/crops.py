"""Crops from the scene: a thumbnail of one nodule's views, its cube as a volume node, every nodule exported.

Both cut with the torch-free patch code in Slicer's process, with the adapter's view
set, field of view and size, so the user sees what the model sees. The export writes
exactly what ``medlora crop`` writes (the same files, names and ``index.csv``), so
crops from Slicer and from the command line can be mixed.

This is the one module of the Slicer layer that imports the crop library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..crops import CropJob, crop_folder, crop_study, montage, write_index
from ..errors import MedLoRAError
from ..image import CTImage
from ..nodule import centres_lps
from ..patches import PatchSpec, cube_geometry, extract_patches
from .mrml import ScenePoint, add_volume_node, markups_to_points, volume_to_ct_image

LUNG_WINDOW_HU = (-1000.0, 400.0)


def display_spec(spec: PatchSpec) -> PatchSpec:
    """The adapter's patch geometry, windowed to [0, 1] for display."""
    return PatchSpec(views=spec.views, fov_mm=spec.fov_mm, pixels=spec.pixels,
                     window_hu=spec.window_hu or LUNG_WINDOW_HU, normalisation="unit")


def thumbnail(volume_node, point: ScenePoint, spec: PatchSpec) -> np.ndarray:
    """One nodule's views tiled three per row as a uint8 image (a cube shows its three middle slices)."""
    spec = display_spec(spec)
    image = volume_to_ct_image(volume_node)
    if not image.geometry.contains_lps(np.array([point.nodule.centre_lps]))[0]:
        raise MedLoRAError(f"'{point.name}' lies outside volume '{volume_node.GetName()}': nothing to show.")
    views = extract_patches(image, np.array([point.nodule.centre_lps]), spec, require_inside=False)[0]
    if spec.views == "cube":
        middle = spec.pixels // 2
        views = np.stack([views[middle], views[:, middle], views[:, :, middle]])
    return montage(views)


def save_thumbnail(volume_node, point: ScenePoint, spec: PatchSpec, path: str | os.PathLike) -> Path:
    """Write the thumbnail as a PNG, atomically (the widget shows the file)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(thumbnail(volume_node, point, spec)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def cube_to_volume(scene, volume_node, point: ScenePoint, spec: PatchSpec, name: str | None = None):
    """The ``cube`` patch around a point as a new volume node in HU, placed exactly where it was cut.

    It has the adapter's field of view and size whatever its view set, so it overlays
    the CT in the slice views and its values read as Hounsfield units.
    """
    spec = PatchSpec(views="cube", fov_mm=spec.fov_mm, pixels=spec.pixels, window_hu=None, normalisation="none")
    image = volume_to_ct_image(volume_node)
    cube = extract_patches(image, np.array([point.nodule.centre_lps]), spec)[0]
    geometry = cube_geometry(np.asarray(point.nodule.centre_lps), spec)
    return add_volume_node(scene, CTImage(voxels_hu=cube, geometry=geometry), name or f"{point.name} cube")


def crop_job_for(spec: PatchSpec) -> CropJob:
    """``medlora crop`` settings matching an adapter's patches (PNG montages; NRRD in HU for cubes)."""
    cube = spec.views == "cube"
    return CropJob(views=spec.views, fov_mm=spec.fov_mm, pixels=spec.pixels,
                   window_hu=spec.window_hu or LUNG_WINDOW_HU, file_format="nrrd" if cube else "png",
                   body_check=False)


@dataclass
class CropExport:
    """What an export wrote, and the points it left out with the reason."""

    index: Path
    written: int
    skipped: list[str] = field(default_factory=list)


def export_crops(pairs: list[tuple[object, object]], out: str | os.PathLike, job: CropJob,
                 overwrite: bool = False) -> CropExport:
    """Every control point of every (volume, markups) pair, as ``medlora crop`` would write them.

    Points outside their volume are left out (listed in ``skipped``); the others of that
    volume are still written. The folder follows ``medlora crop``'s rules: it is written
    whole and atomically, never into a folder holding files crop did not write, and an
    earlier export is replaced only with ``overwrite``.
    """
    out = Path(out)
    rows: list[dict] = []
    skipped: list[str] = []
    with crop_folder(out, overwrite) as staging:
        for volume, markups in pairs:
            image = volume_to_ct_image(volume)
            points = markups_to_points(markups, case_id=volume.GetName())
            inside = image.geometry.contains_lps(centres_lps([p.nodule for p in points])) if points else []
            skipped += [f"{volume.GetName()}: '{p.name}' lies outside the volume" for p, ok in zip(points, inside)
                        if not ok]
            nodules = [p.nodule for p, ok in zip(points, inside) if ok]
            if nodules:
                rows += crop_study(image, nodules, job, staging, volume.GetName(), len(rows) + 1)
        if not rows:
            raise MedLoRAError("no point to export: place points on the nodules of a loaded volume first"
                               + (f" ({'; '.join(skipped)})" if skipped else "."))
        write_index(rows, staging / "index.csv")
    return CropExport(index=out / "index.csv", written=len(rows), skipped=skipped)
