"""Nodule crops as files: cut each nodule's patch from a CT into images and an index CSV.

What ``medlora crop`` and the Slicer module's export share: finding the studies in a
folder, cutting (``CropJob``, ``crop_study``), writing PNG montages, ``.npy`` arrays or
NRRD cubes in HU with the cube's own grid, and the index. 2D view sets become PNG
montages (planes tiled three per row, the HU window mapped to 0–255) or ``.npy`` arrays;
``cube`` becomes NRRD (overlays the CT exactly in Slicer) or ``.npy``.

An output folder is replaced as a whole (``crop_folder``): the files appear together, and
a folder holding anything crop did not write (files not listed in its ``index.csv``) is
never touched. Torch-free and Python 3.9-safe: Slicer's process imports it.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import PatchError
from .outputs import FolderOutput

FORMATS_2D = ("png", "npy")
FORMATS_CUBE = ("nrrd", "npy")
INDEX_NAME = "index.csv"
INDEX_COLUMNS = ("nodule_id", "case_id", "series_uid", "x_lps", "y_lps", "z_lps", "source", "label",
                 "malignancy", "diameter_mm", "reader_count", "study", "file")

# Measured peak of cutting and saving one patch (tracemalloc, patches.extract_patches): about 100 bytes
# per sample point (float64 offsets and coordinates) plus 4 per sample and nodule cut together; the
# saved copy adds up to 8 more.
SAMPLE_BYTES = 104
SAMPLE_BYTES_PER_NODULE = 8
MEMORY_LIMIT_BYTES = 4 * 1024 ** 3


@dataclass
class Study:
    """One CT to crop or score, and the name it has in the results.

    Args:
        name: how tables and file indices name the study (file or folder name, Slicer node name).
        volume: the CT — a DICOM folder or volume file (``Path``) on the command line, a
            ``vtkMRMLScalarVolumeNode`` in Slicer.
        markups: where the points come from when they are not one shared file (a Slicer
            markups node), else ``None``.
        found_by: how the points were matched to the volume, or why none were found.
    """

    name: str
    volume: object
    markups: object | None = None
    found_by: str = ""

    @property
    def path(self) -> Path:
        """The CT's file or folder (command line studies)."""
        return Path(self.volume)


def safe_name(text: str, fallback: str = "nodule") -> str:
    """``text`` as a portable file name part: runs of other characters become ``_``, no leading dot."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or fallback


# --- finding the studies -----------------------------------------------------------------
def _is_dicom_file(path: Path) -> bool:
    from .ctio import DICOM_SUFFIXES

    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _is_volume_file(path: Path) -> bool:
    from .ctio import VOLUME_SUFFIXES

    name = path.name.lower()
    return path.is_file() and any(name.endswith(s) for s in VOLUME_SUFFIXES)


def find_studies(volume: Path) -> list[Study] | None:
    """The studies of a folder of studies, or None when ``volume`` is one study.

    A folder is one study when it holds DICOM files itself, or a single subfolder and no
    volume files (a DICOM tree); otherwise each subfolder and each volume file is a study.
    """
    volume = Path(volume)
    if not volume.is_dir():
        return None
    children = [p for p in sorted(volume.iterdir()) if not p.name.startswith(".")]
    folders = [p for p in children if p.is_dir()]
    volumes = [p for p in children if _is_volume_file(p)]
    if any(p.is_file() and _is_dicom_file(p) for p in children) or (len(folders) <= 1 and not volumes):
        return None
    return [Study(name=p.name, volume=p) for p in folders + volumes]


# --- writing -------------------------------------------------------------------------------
def montage(patch: np.ndarray) -> np.ndarray:
    """Planes of a [0, 1] patch (planes, P, P) tiled three per row as one uint8 image."""
    planes, p, _ = patch.shape
    columns = min(planes, 3)
    rows = -(-planes // columns)
    tiles = np.zeros((rows * p, columns * p), dtype=np.uint8)
    for index, plane in enumerate(patch):
        r, c = divmod(index, columns)
        tiles[r * p:(r + 1) * p, c * p:(c + 1) * p] = np.round(np.clip(plane, 0.0, 1.0) * 255)
    return tiles


def save_png(image: np.ndarray, path: Path) -> None:
    """A uint8 image as PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def save_npy(array: np.ndarray, path: Path) -> None:
    """An array as ``.npy``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def write_index(rows: list[dict], path: Path) -> None:
    """The index CSV, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def indexed_files(folder: Path) -> set[str] | None:
    """Names of the files a crop index in ``folder`` lists, or None when there is no crop index."""
    try:
        with open(folder / INDEX_NAME, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != INDEX_COLUMNS:
                return None
            return {row["file"] for row in reader if row.get("file")}
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


# --- the output folder ---------------------------------------------------------------------
CROP_OUTPUT = FolderOutput(command="crop", index_name=INDEX_NAME, listed=indexed_files, contents="images")
check_crop_folder = CROP_OUTPUT.check  # refuse a file, foreign files, or (without overwrite) an earlier crop
crop_folder = CROP_OUTPUT.writing  # a staging folder that replaces --out as a whole on success


# --- cropping ------------------------------------------------------------------------------
def memory_limit_bytes() -> int:
    """What one crop may use: 4 GiB, or half the physical memory when that is less."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return MEMORY_LIMIT_BYTES
    return int(min(MEMORY_LIMIT_BYTES, physical // 2)) if physical > 0 else MEMORY_LIMIT_BYTES


def _samples(views: str, pixels: int) -> int:
    from .patches import VIEW_PLANES

    return pixels ** 3 if views == "cube" else len(VIEW_PLANES[views]) * pixels ** 2


def crop_memory_bytes(views: str, pixels: int, nodules: int = 1) -> int:
    """Estimated peak memory of cutting and saving ``nodules`` patches at once."""
    return _samples(views, pixels) * (SAMPLE_BYTES + SAMPLE_BYTES_PER_NODULE * nodules)


def max_pixels(views: str, limit_bytes: int | None = None) -> int:
    """The largest ``pixels`` whose patch fits in ``limit_bytes`` (default ``memory_limit_bytes()``)."""
    limit = memory_limit_bytes() if limit_bytes is None else limit_bytes
    per_pixel_power = limit / _samples(views, 1) / (SAMPLE_BYTES + SAMPLE_BYTES_PER_NODULE)
    pixels = int(per_pixel_power ** (1 / 3 if views == "cube" else 1 / 2))
    while crop_memory_bytes(views, pixels + 1) <= limit:
        pixels += 1
    while pixels > 2 and crop_memory_bytes(views, pixels) > limit:
        pixels -= 1
    return pixels


def _gib(n: float) -> str:
    return f"{n / 1024 ** 3:.1f} GiB" if n < 1024 ** 4 else f"{n / 1024 ** 4:,.0f} TiB"


@dataclass
class CropJob:
    """What to cut and how to write it; refuses settings that cannot work before any CT is read."""

    views: str
    fov_mm: float
    pixels: int
    window_hu: tuple[float, float]
    file_format: str
    body_check: bool = True

    def __post_init__(self) -> None:
        formats = FORMATS_CUBE if self.views == "cube" else FORMATS_2D
        if self.file_format not in formats:
            raise PatchError(f"--format {self.file_format} does not suit --views {self.views}: use "
                             f"{' or '.join(formats)}")
        if not np.isfinite(self.fov_mm) or self.fov_mm <= 0 or int(self.pixels) < 2:
            raise PatchError(f"--pixels must be ≥ 2 and --fov-mm a finite size > 0 (got {self.pixels}, {self.fov_mm})")
        self.spec()  # a bad view set or window
        limit = memory_limit_bytes()
        needed = crop_memory_bytes(self.views, int(self.pixels))
        if needed > limit:
            raise PatchError(f"--pixels {self.pixels} with --views {self.views} needs about {_gib(needed)} of memory per "
                             f"nodule ({_samples(self.views, int(self.pixels)):,} samples), over the {_gib(limit)} crop may use "
                             "(4 GiB at most, half this machine's memory at most): use --pixels 2 … "
                             f"{max_pixels(self.views, limit)} with --views {self.views}.")

    def spec(self):
        from .patches import PatchSpec

        if self.views == "cube" and self.file_format == "nrrd":  # HU, so Slicer shows true values
            return PatchSpec(views="cube", fov_mm=self.fov_mm, pixels=self.pixels, window_hu=None,
                             normalisation="none")
        return PatchSpec(views=self.views, fov_mm=self.fov_mm, pixels=self.pixels,
                         window_hu=self.window_hu, normalisation="unit")

    def nodules_per_cut(self) -> int:
        """How many nodules to cut at once within the memory limit."""
        spare = memory_limit_bytes() - _samples(self.views, int(self.pixels)) * SAMPLE_BYTES
        return max(1, spare // (_samples(self.views, int(self.pixels)) * SAMPLE_BYTES_PER_NODULE))


def index_row(nodule, study: str, file: Path) -> dict:
    """One nodule's row of the index."""
    x, y, z = nodule.centre_lps
    return {
        "nodule_id": nodule.nodule_id, "case_id": nodule.case_id, "series_uid": nodule.series_uid,
        "x_lps": f"{x:.3f}", "y_lps": f"{y:.3f}", "z_lps": f"{z:.3f}", "source": nodule.source,
        "label": "" if nodule.label is None else nodule.label,
        "malignancy": "" if nodule.malignancy is None else f"{nodule.malignancy:g}",
        "diameter_mm": "" if nodule.diameter_mm is None else f"{nodule.diameter_mm:.2f}",
        "reader_count": nodule.reader_count, "study": study, "file": file.name,
    }


def _save_patch(patch: np.ndarray, nodule, job: CropJob, spec, out: Path, name: str) -> Path:
    if job.file_format == "png":
        file = out / f"{name}.png"
        save_png(montage(patch), file)
    elif job.file_format == "nrrd":
        from .ctio import save_volume
        from .image import CTImage
        from .patches import cube_geometry

        file = out / f"{name}.nrrd"
        save_volume(CTImage(patch, cube_geometry(np.asarray(nodule.centre_lps), spec)), file)
    else:
        file = out / f"{name}.npy"
        save_npy(patch, file)
    return file


def crop_study(ct, nodules, job: CropJob, out: Path, study: str, first_index: int, progress=None) -> list[dict]:
    """Write one patch per nodule of one CT into ``out``; returns its index rows.

    Files are named ``NNNN_<nodule id>`` from ``first_index`` on. Nodules are cut in groups
    that fit the memory limit.
    """
    from .annotations import validate_inside
    from .patches import extract_patches

    validate_inside(nodules, ct, check_body=job.body_check)
    spec = job.spec()
    step = job.nodules_per_cut()
    rows = []
    for start in range(0, len(nodules), step):
        group = nodules[start:start + step]
        patches = extract_patches(ct, np.array([n.centre_lps for n in group]), spec)
        for offset, (nodule, patch) in enumerate(zip(group, patches), start=start):
            file = _save_patch(patch, nodule, job, spec, out, f"{first_index + offset:04d}_{safe_name(nodule.nodule_id)}")
            rows.append(index_row(nodule, study, file))
            if progress is not None:
                progress.update(1)
    return rows
