"""``medlora crop``: cut each nodule's patch from a CT into image files and an index CSV.

One study: ``--volume`` is a DICOM folder or a volume file and ``--points`` any supported
annotation file (points CSV, Slicer ``.mrk.json``, LIDC XML, LUNA16 or NLSTx CSV).
Several studies: ``--volume`` is a folder whose subfolders (or volume files) are one
study each, and ``--points`` names each nodule's series (LUNA16, NLSTx) or image (a
points CSV with an ``image`` column).

2D view sets are written as PNG montages (planes tiled three per row, the HU window
mapped to 0–255) or ``.npy`` arrays; ``cube`` as NRRD in HU with the cube's own grid
(``cube_geometry``), so it overlays the CT exactly in Slicer, or ``.npy``. Torch-free.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import AnnotationError, MedLoRAError

log = logging.getLogger(__name__)

FORMATS_2D = ("png", "npy")
FORMATS_CUBE = ("nrrd", "npy")
INDEX_COLUMNS = ("nodule_id", "case_id", "series_uid", "x_lps", "y_lps", "z_lps", "source", "label",
                 "malignancy", "diameter_mm", "reader_count", "study", "file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--volume", required=True,
                        help="CT: DICOM folder or volume file, or a folder of studies (one per subfolder/file)")
    parser.add_argument("--points", required=True,
                        help="nodule annotations: points CSV, .mrk.json, LIDC XML, LUNA16 or NLSTx CSV")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--views", choices=("axial", "ortho3", "multiview9", "cube"), default="multiview9")
    parser.add_argument("--fov-mm", type=float, default=50.0, help="patch edge in mm (default 50)")
    parser.add_argument("--pixels", type=int, default=64, help="samples along each edge (default 64)")
    parser.add_argument("--window", type=float, nargs=2, default=(-1000.0, 400.0), metavar=("LOW", "HIGH"),
                        help="HU window mapped to 0–255 in PNG and 0–1 in .npy (default -1000 400); "
                             "cube NRRD files keep HU")
    parser.add_argument("--format", choices=("png", "npy", "nrrd"),
                        help="png or npy for 2D view sets (default png); nrrd or npy for cube (default nrrd)")
    parser.add_argument("--points-format", choices=("lidc", "luna16", "nlstx", "markups", "points"),
                        help="annotation format, when detecting it from the content is not wanted")
    parser.add_argument("--series-uid", help="DICOM series to read when the folder holds several")
    parser.add_argument("--min-readers", type=int, help="LIDC XML: keep nodules marked by at least N readers")
    parser.add_argument("--no-body-check", action="store_true",
                        help="do not refuse points that lie in the air outside the patient")


@dataclass
class Study:
    """One CT to crop, and how it is named in the index."""

    path: Path
    name: str


# --- finding the studies -----------------------------------------------------------------
def _is_dicom_file(path: Path) -> bool:
    from ..ctio import DICOM_SUFFIXES

    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _is_volume_file(path: Path) -> bool:
    from ..ctio import VOLUME_SUFFIXES

    name = path.name.lower()
    return path.is_file() and any(name.endswith(s) for s in VOLUME_SUFFIXES)


def find_studies(volume: Path) -> list[Study] | None:
    """The studies of a folder of studies, or None when ``volume`` is one study.

    A folder is one study when it holds DICOM files itself, or a single subfolder and no
    volume files (a DICOM tree); otherwise each subfolder and each volume file is a study.
    """
    if not volume.is_dir():
        return None
    children = [p for p in sorted(volume.iterdir()) if not p.name.startswith(".")]
    folders = [p for p in children if p.is_dir()]
    volumes = [p for p in children if _is_volume_file(p)]
    if any(p.is_file() and _is_dicom_file(p) for p in children) or (len(folders) <= 1 and not volumes):
        return None
    return [Study(p, p.name) for p in folders + volumes]


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


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    _atomic_write(path, lambda temp: Image.fromarray(image).save(temp, format="PNG"))


def _save_npy(array: np.ndarray, path: Path) -> None:
    def write(temp: str) -> None:
        with open(temp, "wb") as handle:
            np.save(handle, array)

    _atomic_write(path, write)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "nodule"


def write_index(rows: list[dict], path: Path) -> None:
    """The index CSV, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)

    def write(temp: str) -> None:
        Path(temp).write_text(buffer.getvalue(), encoding="utf-8")

    _atomic_write(path, write)


# --- cropping ------------------------------------------------------------------------------
@dataclass
class CropJob:
    """What to cut and how to write it."""

    views: str
    fov_mm: float
    pixels: int
    window_hu: tuple[float, float]
    file_format: str
    body_check: bool = True

    def spec(self):
        from ..patches import PatchSpec

        if self.views == "cube" and self.file_format == "nrrd":  # HU, so Slicer shows true values
            return PatchSpec(views="cube", fov_mm=self.fov_mm, pixels=self.pixels, window_hu=None,
                             normalisation="none")
        return PatchSpec(views=self.views, fov_mm=self.fov_mm, pixels=self.pixels,
                         window_hu=self.window_hu, normalisation="unit")


def crop_study(ct, nodules, job: CropJob, out: Path, study: str, first_index: int, progress=None) -> list[dict]:
    """Write one patch per nodule of one CT; returns its index rows."""
    from ..annotations import validate_inside
    from ..image import CTImage
    from ..patches import cube_geometry, extract_patches

    validate_inside(nodules, ct, check_body=job.body_check)
    spec = job.spec()
    patches = extract_patches(ct, np.array([n.centre_lps for n in nodules]), spec)
    rows = []
    for offset, (nodule, patch) in enumerate(zip(nodules, patches)):
        name = f"{first_index + offset:04d}_{_safe_name(nodule.nodule_id)}"
        if job.file_format == "png":
            file = out / f"{name}.png"
            _save_png(montage(patch), file)
        elif job.file_format == "nrrd":
            from ..ctio import save_volume

            file = out / f"{name}.nrrd"
            save_volume(CTImage(patch, cube_geometry(np.asarray(nodule.centre_lps), spec)), file)
        else:
            file = out / f"{name}.npy"
            _save_npy(patch, file)
        x, y, z = nodule.centre_lps
        rows.append({
            "nodule_id": nodule.nodule_id, "case_id": nodule.case_id, "series_uid": nodule.series_uid,
            "x_lps": f"{x:.3f}", "y_lps": f"{y:.3f}", "z_lps": f"{z:.3f}", "source": nodule.source,
            "label": "" if nodule.label is None else nodule.label,
            "malignancy": "" if nodule.malignancy is None else f"{nodule.malignancy:g}",
            "diameter_mm": "" if nodule.diameter_mm is None else f"{nodule.diameter_mm:.2f}",
            "reader_count": nodule.reader_count, "study": study, "file": file.name,
        })
        if progress is not None:
            progress.update(1)
    return rows


def _file_format(args: argparse.Namespace) -> str:
    if args.views == "cube":
        chosen = args.format or "nrrd"
        if chosen not in FORMATS_CUBE:
            raise MedLoRAError(f"--format {chosen} does not hold a 3D cube: use nrrd or npy with --views cube")
    else:
        chosen = args.format or "png"
        if chosen not in FORMATS_2D:
            raise MedLoRAError(f"--format {chosen} is for --views cube; use png or npy for {args.views}")
    return chosen


def _importer_options(args: argparse.Namespace, fmt: str) -> dict:
    if args.min_readers is None:
        return {}
    if fmt != "lidc":
        raise MedLoRAError("--min-readers applies to LIDC XML reads only")
    return {"min_readers": args.min_readers}


def _check_folder_points(points: Path, fmt: str) -> None:
    """A folder of studies needs points that say which study each belongs to."""
    from ..annotations._common import read_csv

    if fmt in ("lidc", "markups"):
        raise AnnotationError(f"{points} ({fmt}) does not say which study each point belongs to; with a folder "
                              "of studies use a LUNA16 or NLSTx CSV, or a points CSV with an 'image' column")
    if fmt == "points":
        header, rows = read_csv(points, "points", ("x", "y", "z", "coordinate_system"))
        unnamed = [r.line for r in rows if not r.get("image")] if "image" in header else [rows[0].line]
        if unnamed:
            raise AnnotationError(f"{points} line {unnamed[0]}: with a folder of studies every row needs an "
                                  "'image' (the study's folder or file, relative to the CSV)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..annotations import detect_format, load_nodules
    from ..ctio import load_ct

    if args.pixels < 2 or args.fov_mm <= 0:
        raise MedLoRAError(f"--pixels must be ≥ 2 and --fov-mm > 0 (got {args.pixels}, {args.fov_mm})")
    volume, points, out = Path(args.volume), Path(args.points), Path(args.out)
    if not volume.exists():
        raise MedLoRAError(f"--volume {volume} does not exist")
    job = CropJob(args.views, args.fov_mm, args.pixels, tuple(args.window), _file_format(args),
                  body_check=not args.no_body_check)
    job.spec()  # refuse a bad window etc. before any loading
    fmt = args.points_format or detect_format(points)
    options = _importer_options(args, fmt)
    studies = find_studies(volume)
    rows: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)
    if studies is None:
        ct = load_ct(volume, series_uid=args.series_uid)
        nodules = load_nodules(points, image=ct, fmt=fmt, **options)
        if not nodules:
            raise AnnotationError(f"{points} has nodules, but none for this CT ({volume.name}): check that the "
                                  "file names this series or image")
        with tqdm(total=len(nodules), desc="nodules", unit="nodule", disable=None) as bar:
            rows = crop_study(ct, nodules, job, out, volume.name, 1, bar)
    else:
        _check_folder_points(points, fmt)
        skipped = []
        for study in tqdm(studies, desc="studies", unit="study", disable=None):
            try:
                ct = load_ct(study.path, series_uid=args.series_uid)
            except MedLoRAError as exc:
                skipped.append(f"{study.name}: {exc}")
                continue
            nodules = load_nodules(points, image=ct, fmt=fmt, **options)
            if nodules:
                rows += crop_study(ct, nodules, job, out, study.name, len(rows) + 1)
        for line in skipped:
            log.warning("skipped study %s", line)
        if not rows:
            raise AnnotationError(f"no nodule in {points} belongs to any of the {len(studies)} studies in {volume} "
                                  f"({len(skipped)} could not be read); check the series UIDs / image names")
    write_index(rows, out / "index.csv")
    print(f"wrote {len(rows)} patch(es) ({job.views}, {job.file_format}) and index.csv to {out}")
    return 0
