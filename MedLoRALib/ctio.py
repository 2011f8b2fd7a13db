"""Reading CT volumes (DICOM series, NRRD, NIfTI, MetaImage) into a CTImage, and saving them.

DICOM geometry is computed here from the tags, not trusted to the pixel reader: every slice's
``ImagePositionPatient`` is projected on the slice normal (row × column of
``ImageOrientationPatient``) and the slices are sorted by that position (``InstanceNumber`` is
ignored). A series that would be read wrongly is refused with a ``CTLoadError`` that says what is
wrong and where: missing slices, duplicated slices, non-uniform spacing, mixed orientations or sizes,
and gantry tilt. SimpleITK (GDCM) decodes the pixels, applying each file's rescale slope and
intercept, so voxels come back in Hounsfield units.

Choosing a series in a folder with several: the CT series with the most slices, ties broken by the
thinnest slice step. Series still tied after that (e.g. two reconstruction kernels of one scan) are
refused with a list of them rather than picked arbitrarily. Localizer (scout) images are never part
of a volume. Pass ``series_uid`` (the full SeriesInstanceUID, or the 8-character key shown in
messages) to choose another. A series whose slices differ in Modality (an MR image filed into a CT
series) is refused, naming the odd files.

Values that would make a wrong volume are refused, naming the file: NaN or infinite voxels, and
voxel spacings outside ``MIN_SPACING_MM``-``MAX_SPACING_MM`` (zero, negative, non-finite or absurd
PixelSpacing, slice steps or volume-file spacings).

Gantry tilt is refused rather than corrected: correcting it means resampling the whole volume,
which would add a second interpolation to every patch (see DESIGN "one interpolation per patch").
Resample the series once (e.g. 3D Slicer's DICOM "acquisition geometry regularization") and load
the saved NRRD instead.

Patient and study identifiers never appear in logs or messages; a series is named by its place in
the folder ("series 2 of 3") and a short hash of its UID (``series_key``).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path
from .errors import CTLoadError, MedLoRAError
from .geometry import Geometry
from .image import CTImage, StudyIds

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
WRITABLE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Files that are certainly not DICOM: skipped without being opened.
NOT_DICOM_SUFFIXES = (".xml", ".txt", ".json", ".csv", ".md", ".html", ".pdf", ".png", ".jpg", ".jpeg",
                      ".zip", ".gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".raw", ".py", ".log")

GAP_FACTOR = 1.5              # a step this many times the median step means missing slices
SPACING_TOLERANCE = 0.05      # steps may differ from the median by 5 % (rounding in the tags)
DUPLICATE_FRACTION = 0.1      # two slices closer than 10 % of the step are the same position
TILT_TOLERANCE_PIXELS = 0.25  # sideways slice offset allowed before a stack counts as tilted
ORIENTATION_TOLERANCE = 1e-3  # IOP components may differ this much between slices of one stack
STEP_TIE_MM = 1e-3            # slice steps closer than this tie when choosing a series
MIN_SPACING_MM = 0.01         # below: a header in metres or a corrupt one (micro-CT starts near 0.01 mm)
MAX_SPACING_MM = 100.0        # above: no CT voxel; 1e30 would put every patch inside one voxel
MAX_ORIGIN_MM = 1e5           # 100 m from the scanner's origin: a corrupt header (and float precision is lost)
MAX_ABS_HU = 1e6              # CT spans about -1024 to 30000 HU (extended range); beyond: not HU, or a bad slope

_TAGS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "Modality",
         "SeriesDescription", "SeriesNumber", "ImageType", "ImagePositionPatient",
         "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "NumberOfFrames",
         "RescaleSlope", "RescaleIntercept", "SliceThickness"]


def series_key(uid: str) -> str:
    """A short, stable stand-in for a UID in messages (the first 8 hex digits of its SHA-1)."""
    return hashlib.sha1(uid.encode()).hexdigest()[:8]


# --------------------------------------------------------------------------------------------
# DICOM headers
# --------------------------------------------------------------------------------------------
@dataclass
class DicomSlice:
    """The header facts of one DICOM image file that decide how it joins a volume."""

    path: Path
    position_lps: np.ndarray | None
    orientation: np.ndarray | None  # (6,) row then column direction cosines, LPS
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
    rows: int
    columns: int
    frames: int
    is_localizer: bool
    rescale: tuple[float, float] = (1.0, 0.0)  # (slope, intercept)
    modality: str = ""

    @property
    def has_geometry(self) -> bool:
        return self.position_lps is not None and self.orientation is not None and self.pixel_spacing is not None


def _short_uid(uid: str) -> str:
    """A UID cut to its first and last digits: enough to recognise it in a DICOM browser."""
    return uid if len(uid) <= 20 else f"{uid[:8]}…{uid[-8:]}"


@dataclass
class SeriesInfo:
    """One series found in a folder; identifiers are kept out of its repr."""

    uid: str = field(repr=False)
    modality: str
    description: str
    series_number: int | None
    slices: list[DicomSlice] = field(repr=False)
    localizers: int = 0
    other_images: int = 0  # images without position/orientation (secondary captures, ...)
    patient_id: str = field(default="", repr=False)
    study_uid: str = field(default="", repr=False)
    index: int = 0  # 1-based place in the folder's listing
    total: int = 0

    @property
    def key(self) -> str:
        return series_key(self.uid)

    @property
    def slice_step_mm(self) -> float | None:
        """Median distance between neighbouring slices along the normal (None below 2 slices)."""
        stack = [s for s in self.slices if s.has_geometry]
        if len(stack) < 2:
            return None
        normal = _normal(stack[0].orientation)
        positions = np.sort([float(s.position_lps @ normal) for s in stack])
        return float(np.median(np.diff(positions)))

    @property
    def is_ct_volume(self) -> bool:
        return self.modality == "CT" and len(self.slices) > 0

    @property
    def odd_modality_slices(self) -> list[DicomSlice]:
        """Slices whose Modality differs from the series' (the most common one among its slices)."""
        return [s for s in self.slices if s.modality != self.modality]

    def describe(self) -> str:
        parts = [self.modality or "unknown modality"]
        if self.slices:
            parts.append(f"{len(self.slices)} slices")
        odd = self.odd_modality_slices
        if odd:
            parts.append(f"{len(odd)} of them {'/'.join(sorted({s.modality or '?' for s in odd}))}")
        if self.localizers:
            parts.append(f"{self.localizers} localizer images")
        if self.other_images:
            parts.append(f"{self.other_images} images without slice position")
        if self.description:
            parts.append(repr(self.description))
        parts.append(f"key {self.key}")
        where = f"series {self.index} of {self.total}" if self.total else "series"
        return f"{where} ({', '.join(parts)})"


def _is_dicom_candidate(path: Path) -> tuple[bool, bool]:
    """(worth parsing, certainly DICOM): by the 'DICM' magic, else by suffix."""
    name = path.name.lower()
    if name.startswith(".") or name.endswith(NOT_DICOM_SUFFIXES):
        return False, False
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise CTLoadError(f"cannot open {path.name}: {exc.strerror}. Check the file permissions.") from exc
    if head[128:132] == b"DICM":
        return True, True
    return True, name.endswith(DICOM_SUFFIXES)


def _floats(value, count: int, finite: bool = True) -> np.ndarray | None:
    """A multi-valued numeric tag as floats, None when absent, of the wrong length or (if ``finite``) NaN/inf."""
    if value is None or value == "":
        return None
    values = np.atleast_1d(np.asarray([float(v) for v in np.atleast_1d(value)], dtype=float))
    return values if values.size == count and (not finite or np.isfinite(values).all()) else None


def _rescale(ds) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) as stored (absent: 1, 0); checked when the series is stacked."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return (1.0 if slope in (None, "") else float(slope), 0.0 if intercept in (None, "") else float(intercept))


def _read_header(path: Path, certainly_dicom: bool, shown_name: str):
    """(dataset, DicomSlice) for an image file, None for a non-image or non-DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS, force=not certainly_dicom)
        if "SeriesInstanceUID" not in ds or "SOPClassUID" not in ds:
            if not certainly_dicom:
                return None
            if "MediaStorageSOPClassUID" in getattr(ds, "file_meta", {}):
                return ds, None  # a DICOM object that is not an image (DICOMDIR, ...)
            raise CTLoadError(f"{shown_name} is a corrupt DICOM file (no readable header elements). Remove it "
                              "from the folder or replace it with an intact copy.")
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if rows == 0 or columns == 0:
            return ds, None  # SR, RTSTRUCT, presentation states ...: no pixels
        spacing = _floats(ds.get("PixelSpacing"), 2, finite=False)  # checked, and named, when stacked
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        slice_ = DicomSlice(
            path=path,
            position_lps=_floats(ds.get("ImagePositionPatient"), 3),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
            rows=rows, columns=columns, frames=int(ds.get("NumberOfFrames", 1) or 1),
            is_localizer="LOCALIZER" in image_type,
            rescale=_rescale(ds),
            modality=str(ds.get("Modality", "") or "").upper())
    except InvalidDicomError:
        if certainly_dicom:
            raise CTLoadError(f"{shown_name} is not a valid DICOM file (no DICOM header). Remove it from the "
                              "folder or replace it with an intact copy.") from None
        return None
    except Exception as exc:  # pydicom raises many types on corrupt headers; report, never skip
        if certainly_dicom:
            raise CTLoadError(f"{shown_name} is a corrupt DICOM file ({type(exc).__name__}: {exc}). Remove it "
                              "from the folder or replace it with an intact copy.") from exc
        return None
    return ds, slice_


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """Every DICOM series under ``folder`` (searched recursively), ordered by SeriesNumber."""
    root = Path(folder)
    if not root.exists():
        raise CTLoadError(f"{root} does not exist. Check the path.")
    if not root.is_dir():
        raise CTLoadError(f"{root} is not a folder.")
    groups: dict[str, SeriesInfo] = {}
    ignored: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            shown = str(path.relative_to(root))
            worth, certain = _is_dicom_candidate(path)
            result = _read_header(path, certain, shown) if worth else None
            if result is None:
                ignored.append(shown)
                continue
            ds, slice_ = result
            uid = str(ds.get("SeriesInstanceUID", "")) or "<no series UID>"
            info = groups.get(uid)
            if info is None:
                number = ds.get("SeriesNumber")
                info = groups[uid] = SeriesInfo(
                    uid=uid, modality=str(ds.get("Modality", "")).upper(),
                    description=str(ds.get("SeriesDescription", "") or ""),
                    series_number=int(number) if number not in (None, "") else None, slices=[],
                    patient_id=str(ds.get("PatientID", "") or ""), study_uid=str(ds.get("StudyInstanceUID", "") or ""))
            if slice_ is None:
                continue
            if slice_.is_localizer:
                info.localizers += 1
            elif not slice_.has_geometry:
                info.other_images += 1
            else:
                info.slices.append(slice_)
    if ignored:
        log.debug("ignored %d non-DICOM file(s) in the folder: %s", len(ignored), ", ".join(ignored[:5]))
    for info in groups.values():  # the series' modality is its slices' majority, not its first file's
        if info.slices:
            info.modality = Counter(s.modality for s in info.slices).most_common(1)[0][0]
    series = sorted(groups.values(), key=lambda s: (s.series_number is None, s.series_number or 0, s.key))
    for index, info in enumerate(series, start=1):
        info.index, info.total = index, len(series)
    return series


def _pick_series(series: list[SeriesInfo], folder: Path, series_uid: str | None) -> SeriesInfo:
    listing = "; ".join(s.describe() for s in series)
    if series_uid is not None:
        wanted = series_uid.strip()
        found = [s for s in series if wanted in (s.uid, s.key)]
        if not found:
            raise CTLoadError(f"the requested series (key {series_key(wanted) if len(wanted) != 8 else wanted}) is "
                              f"not in {folder}. The folder holds: {listing}. Pass one of these keys or its "
                              "SeriesInstanceUID.")
        chosen = found[0]
        if not chosen.is_ct_volume:
            raise CTLoadError(f"the requested {chosen.describe()} is not a CT image volume. The folder holds: {listing}.")
        return chosen
    candidates = [s for s in series if s.is_ct_volume]
    if not candidates:
        raise CTLoadError(f"no CT image series in {folder}: it holds {listing}. MedLoRA needs a CT volume "
                          "(Modality CT, axial images with position and orientation).")
    step = {s.key: abs(s.slice_step_mm or np.inf) for s in candidates}
    chosen = min(candidates, key=lambda s: (-len(s.slices), step[s.key], s.index))
    tied = [s for s in candidates if len(s.slices) == len(chosen.slices)
            and (step[s.key] == step[chosen.key] or abs(step[s.key] - step[chosen.key]) < STEP_TIE_MM)]
    if len(tied) > 1:
        listing = "; ".join(f"{s.describe()}, slice step {step[s.key]:.3g} mm, UID {_short_uid(s.uid)}" for s in tied)
        raise CTLoadError(
            f"{folder} holds {len(tied)} CT series that tie under the rule that picks one (most slices, then the "
            f"thinnest slice step): {listing}. MedLoRA does not guess between them (they may be different "
            "reconstructions of one scan). Choose one by its key or SeriesInstanceUID: --series-uid on the "
            f"command line, the series_uid column of a manifest (e.g. --series-uid {chosen.key}).")
    others = [s.describe() for s in series if s is not chosen]
    if others:
        log.info("%s holds %d series; using %s (the CT series with the most slices). Others: %s. "
                 "Choose another with series_uid (key or UID).", folder.name or str(folder), len(series),
                 chosen.describe(), "; ".join(others))
    return chosen


# --------------------------------------------------------------------------------------------
# Geometry checks
# --------------------------------------------------------------------------------------------
def _normal(orientation: np.ndarray) -> np.ndarray:
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def _orthonormal_axes(orientation: np.ndarray, where: str) -> np.ndarray:
    """3×3 direction (columns: row axis i, column axis j, normal k) from IOP, checked."""
    row, col = orientation[:3], orientation[3:]
    if not (abs(np.linalg.norm(row) - 1) < 1e-2 and abs(np.linalg.norm(col) - 1) < 1e-2 and abs(row @ col) < 1e-2):
        raise CTLoadError(f"{where}: ImageOrientationPatient {np.round(orientation, 4).tolist()} is not two "
                          "perpendicular unit vectors; the file's geometry is corrupt.")
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row  # remove rounding in the tags
    col = col / np.linalg.norm(col)
    return np.column_stack([row, col, np.cross(row, col)])


_FIX_VOLUME = "correct the spacing (e.g. in 3D Slicer's Volumes module) and save the volume again"
_FIX_DICOM = "export the series again from the scanner or PACS, or load a converted NRRD/NIfTI with correct spacing"


def check_spacing(spacing_mm, where: str, what: str = "voxel spacing", fix: str = _FIX_VOLUME) -> None:
    """Refuse a spacing that is not a plausible CT voxel size (zero, negative, NaN/inf, 1e30, metres)."""
    values = [float(v) for v in spacing_mm]
    for value in values:
        if not np.isfinite(value):
            reason = "is not a finite number"
        elif value <= 0:
            reason = "must be positive"
        elif not MIN_SPACING_MM <= value <= MAX_SPACING_MM:
            reason = f"is outside the {MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm of any CT"
        else:
            continue
        shown = " × ".join(f"{v:g}" for v in values)
        raise CTLoadError(f"{where}: {what} {shown} mm is invalid ({value:g} {reason}). The header is corrupt or "
                          f"in another unit; {fix}.")


def _check_origin(origin_lps, where: str) -> None:
    values = np.asarray(origin_lps, dtype=float)
    if not (np.isfinite(values).all() and np.abs(values).max() <= MAX_ORIGIN_MM):
        raise CTLoadError(f"{where}: origin {values.tolist()} mm is not finite or lies over {MAX_ORIGIN_MM:g} mm "
                          "from the scanner's origin; the header is corrupt. Correct the origin and save it again.")


def _check_one_modality(info: SeriesInfo, folder: Path) -> None:
    """Refuse a series that mixes modalities: the odd slices would be stacked into the CT."""
    odd = info.odd_modality_slices
    if odd:
        names = ", ".join(_shown(s.path, folder) for s in odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        kinds = "/".join(sorted({s.modality or "no Modality" for s in odd}))
        raise CTLoadError(f"{info.describe()} mixes modalities: {len(odd)} of its {len(info.slices)} slices are "
                          f"{kinds} ({names}), the others {info.modality}. They would be stacked into one volume. "
                          "Remove the stray file(s) (they belong to another scan) or export the series again.")


def _shown(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return path.name


def stack_geometry(info: SeriesInfo, folder: Path | None = None) -> tuple[list[DicomSlice], Geometry]:
    """Sort the slices along the normal and refuse stacks that would be read wrongly."""
    where = info.describe()
    slices = info.slices
    for s in slices:
        shown = f"{where}, file {_shown(s.path, folder) if folder else s.path.name}"
        check_spacing(s.pixel_spacing, shown, "PixelSpacing", _FIX_DICOM)
        slope, intercept = s.rescale
        if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0):
            # GDCM would silently read such a file as slope 1: HU values that the header does not support
            raise CTLoadError(f"{shown}: RescaleSlope {slope:g} / RescaleIntercept {intercept:g} cannot turn stored "
                              f"pixels into Hounsfield units (the slope must be a non-zero number); {_FIX_DICOM}.")
    multi = [s for s in slices if s.frames > 1]
    if multi:
        raise CTLoadError(f"{where} is stored as multi-frame (enhanced) DICOM, which MedLoRA does not read. "
                          "Convert it to NRRD or NIfTI (e.g. in 3D Slicer or with dcm2niix) and load that file.")
    if len(slices) < 2:
        raise CTLoadError(f"{where} has a single slice: a 2D image, not a CT volume. Load the full series.")
    orientations = np.array([s.orientation for s in slices])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        distinct = len(np.unique(np.round(orientations, 3), axis=0))
        raise CTLoadError(f"{where} mixes {distinct} slice orientations (e.g. axial and reformatted images in "
                          "one series). Export the axial stack as its own series.")
    sizes = {(s.rows, s.columns) for s in slices}
    spacings = np.array([s.pixel_spacing for s in slices])
    if len(sizes) > 1 or np.abs(spacings - spacings[0]).max() > 1e-4:
        raise CTLoadError(f"{where} mixes image sizes {sorted(sizes)} or pixel spacings; its slices do not "
                          "form one volume.")
    direction = _orthonormal_axes(orientations[0], where)
    normal = direction[:, 2]
    positions = np.array([s.position_lps for s in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    span = along[-1] - along[0]
    nominal = span / (len(slices) - 1)
    if nominal <= 0:
        raise CTLoadError(f"{where}: all {len(slices)} slices are at the same position "
                          f"({along[0]:.2f} mm along the slice normal): duplicated images, not a volume.")
    duplicate = np.flatnonzero(steps < DUPLICATE_FRACTION * nominal)
    if duplicate.size:
        k = int(duplicate[0])
        raise CTLoadError(
            f"{where} has duplicated slices: {duplicate.size} position(s) occur twice, first at "
            f"{along[k]:.2f} mm along the slice normal (files {slices[k].path.name} and {slices[k + 1].path.name}). "
            "Remove the duplicate files (often a second copy or a re-sent image) and load again.")
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        k = int(gaps[0])
        missing = int(round(steps[k] / median)) - 1
        raise CTLoadError(
            f"{where} has missing slices: a gap of {steps[k]:.2f} mm between slice positions {along[k]:.2f} and "
            f"{along[k + 1]:.2f} mm along the normal (after file {slices[k].path.name}), where the usual step is "
            f"{median:.2f} mm — about {missing} slice(s) missing"
            + (f", and {gaps.size - 1} more gap(s)" if gaps.size > 1 else "")
            + ". Re-export or re-download the complete series.")
    if np.abs(steps - median).max() > SPACING_TOLERANCE * median:
        raise CTLoadError(
            f"{where} has non-uniform slice spacing: steps between neighbouring slices range from "
            f"{steps.min():.3f} to {steps.max():.3f} mm (median {median:.3f} mm). A regular grid would misplace "
            "slices; resample the series to uniform spacing first.")
    offsets = positions - positions[0]
    sideways = offsets - np.outer(offsets @ normal, normal)
    lateral = float(np.linalg.norm(sideways, axis=1).max())
    pixel = min(slices[0].pixel_spacing)
    if lateral > max(0.05, TILT_TOLERANCE_PIXELS * pixel):
        angle = float(np.degrees(np.arctan2(np.linalg.norm(sideways[-1]), abs(span))))
        raise CTLoadError(
            f"{where} is tilted (gantry tilt of about {angle:.1f}°): slice positions drift {lateral:.1f} mm "
            "sideways from the slice normal, so the voxels do not form a rectangular grid. MedLoRA refuses "
            "sheared volumes instead of resampling them. Resample once — e.g. in 3D Slicer with "
            "'acquisition geometry regularization' enabled in the DICOM settings — save as NRRD, and load that.")
    row_mm, col_mm = slices[0].pixel_spacing  # PixelSpacing = (between rows, between columns)
    check_spacing([nominal], where, "slice step", _FIX_DICOM)
    _check_origin(positions[0], f"{where}, file {slices[0].path.name}")
    geometry = Geometry(size=(slices[0].columns, slices[0].rows, len(slices)),
                        spacing=(col_mm, row_mm, span / (len(slices) - 1)),
                        origin_lps=tuple(positions[0]), direction=direction)
    return slices, geometry


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------
def compact_hu(voxels: np.ndarray, name: str = "the volume") -> np.ndarray:
    """A new int16 array when every value is an integer that fits, else float32 (exact below 2**24).

    Always returns a fresh array, so ``voxels`` may be a view into a SimpleITK image's buffer.
    NaN or infinite voxels are refused (``name`` says which file), never passed on.
    """
    if voxels.dtype == np.int16 or voxels.size == 0:
        return np.array(voxels, dtype=np.int16)
    lo, hi = voxels.min(), voxels.max()
    fits = -32768 <= lo and hi <= 32767
    if (np.issubdtype(voxels.dtype, np.integer) or voxels.dtype == np.bool_) and fits:
        return voxels.astype(np.int16)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise _non_finite_error(name, int(np.count_nonzero(np.isnan(voxels))),
                                int(np.count_nonzero(np.isinf(voxels))), voxels.size)
    if max(abs(float(lo)), abs(float(hi))) > MAX_ABS_HU:
        raise CTLoadError(f"{name} holds voxel values from {float(lo):.4g} to {float(hi):.4g}: not Hounsfield units "
                          "(a CT spans about -1024 to 30000 HU). The file stores another quantity, or its rescale "
                          "slope/intercept is wrong; convert it to HU and load it again.")
    if fits and np.array_equal(voxels, np.round(voxels)):
        return voxels.astype(np.int16)
    return voxels.astype(np.float32)


def _non_finite_error(name: str, nan: int, inf: int, total: int) -> CTLoadError:
    return CTLoadError(f"{name} holds {nan + inf} non-finite voxel value(s) ({nan} NaN, {inf} infinite) out of "
                       f"{total}: a CT has a finite HU value in every voxel, and MedLoRA does not guess one. "
                       "Replace them (e.g. with -1024 HU where there is no data) and save the volume again.")


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of real float voxels
_COUNT_CHUNK = 1 << 24


def _nifti_non_finite(path: Path) -> tuple[int, int, int] | None:
    """(NaN, infinite, voxels) of a float NIfTI file, counted in the file itself; None if not float NIfTI-1/2.

    ITK's NIfTI reader (nifti1_io's ``nifti_read_buffer``) silently turns NaN and infinite voxels
    into 0, so the file is scanned before its voxels could be scored as zeros.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.read(540)
        order = next((o for o in "<>" if len(head) >= 4 and struct.unpack_from(o + "i", head)[0] in (348, 540)), None)
        if order is None:
            return None
        if struct.unpack_from(order + "i", head)[0] == 348:
            datatype, dims = struct.unpack_from(order + "h", head, 70)[0], struct.unpack_from(order + "8h", head, 40)
            offset = int(struct.unpack_from(order + "f", head, 108)[0])
        else:
            datatype, dims = struct.unpack_from(order + "h", head, 12)[0], struct.unpack_from(order + "8q", head, 16)
            offset = int(struct.unpack_from(order + "q", head, 168)[0])
        if datatype not in _NIFTI_FLOATS or not 1 <= dims[0] <= 7:
            return None
        dtype = np.dtype(order + _NIFTI_FLOATS[datatype])
        total = int(np.prod([max(int(d), 1) for d in dims[1:dims[0] + 1]]))
        needed = total * dtype.itemsize
        buffer = head[offset:offset + needed]
        if offset >= len(head):
            fh.seek(offset)
        got, nan, inf = len(buffer), 0, 0
        while True:
            usable = len(buffer) - len(buffer) % dtype.itemsize
            values = np.frombuffer(buffer[:usable], dtype=dtype)
            nan += int(np.count_nonzero(np.isnan(values)))
            inf += int(np.count_nonzero(np.isinf(values)))
            buffer = buffer[usable:]
            more = fh.read(min(_COUNT_CHUNK, needed - got)) if got < needed else b""
            if not more:
                return nan, inf, total
            got += len(more)
            buffer += more


def _sitk_message(exc: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = [ln for ln in lines if "ERROR" in ln or "error" in ln.lower()]
    text = (detail or lines or ["unknown error"])[-1]
    return text.split(": ", 2)[-1] if text.count(": ") >= 2 else text


def _read_dicom_pixels(slices: list[DicomSlice], info: SeriesInfo, folder: Path) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in slices])
    # Each file is rescaled with its own slope/intercept; float output keeps that exact even when
    # the first file's header would suggest a narrower integer type.
    mixed_rescale = len({s.rescale for s in slices}) > 1
    reader.SetOutputPixelType(sitk.sitkFloat32 if mixed_rescale else sitk.sitkUnknown)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        bad = _find_unreadable(slices)
        name = str(bad.relative_to(folder)) if bad is not None else "one of its files"
        raise CTLoadError(f"cannot read the pixels of {info.describe()}: {name} is corrupt or truncated "
                          f"({_sitk_message(exc)}). Replace it with an intact copy.") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTLoadError(f"{info.describe()} holds colour images, not CT Hounsfield units.")
    return compact_hu(sitk.GetArrayViewFromImage(image), info.describe())


def _find_unreadable(slices: list[DicomSlice]) -> Path | None:
    for s in slices:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(s.path))
        try:
            reader.Execute()
        except RuntimeError:
            return s.path
    return None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def load_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> CTImage:
    """Read one CT series from a folder (see the module docstring for the rule that picks it)."""
    root = Path(folder)
    series = list_series(root)
    if not series:
        raise CTLoadError(f"no DICOM files in {root}. Point to the folder that holds the .dcm files of the series, "
                          f"or to a volume file ({', '.join(VOLUME_SUFFIXES)}).")
    info = _pick_series(series, root, series_uid)
    _check_one_modality(info, root)
    slices, geometry = stack_geometry(info, root)
    voxels = _read_dicom_pixels(slices, info, root)
    if voxels.shape != tuple(reversed(geometry.size)):
        raise CTLoadError(f"{info.describe()}: decoded pixels {voxels.shape} do not match the headers "
                          f"({geometry.size[::-1]}); the series is inconsistent.")
    log.info("read %s: %d×%d×%d voxels, spacing %.3f×%.3f×%.3f mm", info.describe(), *geometry.size, *geometry.spacing)
    ids = StudyIds(patient_id=info.patient_id, study_uid=info.study_uid, series_uid=info.uid)
    return CTImage(voxels_hu=voxels, geometry=geometry, ids=ids, source=str(root))


def ct_from_sitk(image: sitk.Image, ids: StudyIds | None = None, source: str = "", name: str = "the image") -> CTImage:
    """A CTImage from a SimpleITK image in HU: checks it is a 3D scalar volume, compacts the dtype."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTLoadError(f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or "
                          "vector data); a CT has one value (HU) per voxel.")
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dimension = 3
    if dimension == 2 or (dimension == 3 and image.GetSize()[2] == 1):
        raise CTLoadError(f"{name} is a 2D image (one slice); MedLoRA needs a 3D CT volume.")
    if dimension != 3:
        raise CTLoadError(f"{name} has {dimension} dimensions of sizes {image.GetSize()}; MedLoRA needs a 3D CT volume.")
    check_spacing(image.GetSpacing(), name)
    _check_origin(image.GetOrigin(), name)
    try:
        geometry = Geometry.from_sitk(image)
    except ValueError as exc:
        raise CTLoadError(f"{name} has an invalid grid: {exc}.") from exc
    return CTImage(voxels_hu=compact_hu(sitk.GetArrayViewFromImage(image), name), geometry=geometry,
                   ids=ids or StudyIds(), source=source)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def load_volume_file(path: str | os.PathLike) -> CTImage:
    """Read a single-file volume (NRRD, NIfTI, MHA/MHD); values are taken as HU."""
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        detail = _sitk_message(exc)
        if "spacing" in detail.lower() or "space vector" in detail.lower():
            raise CTLoadError(f"cannot read {path.name}: its voxel spacing is zero or not a number ({detail}). "
                              "Correct the spacing in the header and save the volume again.") from exc
        raise CTLoadError(f"cannot read {path.name}: {detail}. The file is corrupt or not a "
                          f"supported volume ({', '.join(VOLUME_SUFFIXES)}).") from exc
    if _suffix(path) in (".nii", ".nii.gz") and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        counts = _nifti_non_finite(path)
        if counts is not None and counts[0] + counts[1]:
            raise _non_finite_error(path.name, *counts)
    image_ct = ct_from_sitk(image, source=str(path), name=path.name)
    log.info("read %s: %d×%d×%d voxels, spacing %.3f×%.3f×%.3f mm", path.name, *image_ct.geometry.size,
             *image_ct.geometry.spacing)
    return image_ct


def load_ct(path: str | os.PathLike, series_uid: str | None = None) -> CTImage:
    """Load a CT in HU with its LPS grid from a DICOM folder, a DICOM file's series, or a volume file.

    Args:
        path: a folder of DICOM files (searched recursively), one DICOM file (its whole series is
            read), or a ``.nrrd``/``.nhdr``/``.nii``/``.nii.gz``/``.mha``/``.mhd`` file.
        series_uid: for DICOM, the SeriesInstanceUID or its 8-character key to read instead of the
            default choice (the CT series with the most slices).
    """
    path = Path(path)
    if not path.exists():
        raise CTLoadError(f"{path} does not exist. Check the path (a DICOM folder or a volume file).")
    if path.is_dir():
        return load_dicom_series(path, series_uid)
    if _suffix(path) in VOLUME_SUFFIXES:
        return load_volume_file(path)
    worth, certain = _is_dicom_candidate(path)
    if worth:
        result = _read_header(path, certain, path.name)
        if result is not None and result[1] is not None:
            wanted = series_uid or str(result[0].get("SeriesInstanceUID"))
            return load_dicom_series(path.parent, wanted)
        if certain:
            raise CTLoadError(f"{path.name} is a DICOM file without an image (e.g. a report or structure set).")
    raise CTLoadError(f"{path.name} is neither DICOM nor a supported volume file ({', '.join(VOLUME_SUFFIXES)}).")


def save_volume(image: CTImage, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``image`` as NRRD, NIfTI or MHA (chosen by suffix), atomically.

    The file appears complete or not at all: it is written beside the target and renamed.
    Identifiers are not written into the file.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in WRITABLE_SUFFIXES:
        raise MedLoRAError(f"cannot save a volume as {path.name}: use one of {', '.join(WRITABLE_SUFFIXES)} "
                           "(.mhd is not offered because its separate data file cannot be written atomically).")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            # zlib level 1: about twice as fast as the default level, files ~15 % larger
            sitk.WriteImage(image.to_sitk(), str(tmp), compress, 1 if compress else -1)
    except RuntimeError as exc:
        raise MedLoRAError(f"cannot write {path}: {_sitk_message(exc)}") from exc
    return path

