"""The training manifest: which nodules, in which images, with which labels (torch-free).

A manifest is a points CSV (docs/architecture.md) whose rows also name an ``image`` and a
``patient_id``, or a JSON file holding the same rows (a list, or ``{"nodules": [...]}``).
A row gives either a centre (``x, y, z`` in mm + ``coordinate_system``) or an
``annotations`` file (LIDC XML, LUNA16 CSV, NLSTx CSV, ``.mrk.json``) whose importer
supplies the centres for that image. Labels are ``0/1``, ``benign/malignant`` (``B/M``),
or a LIDC ``malignancy`` 1–5 (median ≤ 2 benign, ≥ 4 malignant, 3 excluded).

``load_training_set`` reads every image once and collects *all* problems before any
training starts, so a researcher fixes the manifest in one pass instead of one error per run.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..annotations._common import fits_header, parse_json, read_text, shape_problem, show
from ..errors import AnnotationError, DatasetError, MedLoRAError
from ..geometry import Geometry, to_lps
from ..image import CTImage

log = logging.getLogger(__name__)

DUPLICATE_DISTANCE_MM = 2.0
_TRUE_LABELS = {"1", "1.0", "malignant", "m", "true", "yes"}
_FALSE_LABELS = {"0", "0.0", "benign", "b", "false", "no"}


@dataclass(frozen=True)
class ManifestRow:
    """One row as written, with paths resolved against the manifest's folder.

    Attributes:
        row: where it is in the file, for messages (CSV line number or JSON item).
        centre_lps: given centre converted to LPS mm, or None for an annotations row.
        label: 0/1 from ``label`` or the LIDC rule on ``malignancy``; None if not given.
        excluded: why the row carries no usable label (e.g. LIDC malignancy 3), or "".
    """

    row: str
    image: Path
    series_uid: str = ""
    annotations: Path | None = None
    centre_lps: tuple[float, float, float] | None = None
    label: int | None = None
    excluded: str = ""
    patient_id: str = ""
    nodule_id: str = ""
    diameter_mm: float | None = None

    @property
    def image_key(self) -> str:
        return f"{self.image}#{self.series_uid}" if self.series_uid else str(self.image)


@dataclass(frozen=True)
class Sample:
    """One labelled nodule ready to be cut into a patch."""

    image_key: str
    centre_lps: tuple[float, float, float]
    label: int
    patient_id: str
    nodule_id: str
    row: str
    diameter_mm: float | None = None


@dataclass
class TrainingSet:
    """Every usable nodule and (optionally) its image, each loaded once."""

    manifest: Path
    samples: list[Sample]
    images: dict[str, CTImage] = field(default_factory=dict, repr=False)
    excluded: list[str] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=int)

    @property
    def patient_ids(self) -> list[str]:
        return [s.patient_id for s in self.samples]

    def summary(self) -> dict:
        """Counts per class and per patient (what ``medlora dataset check`` prints)."""
        per_patient: dict[str, Counter] = defaultdict(Counter)
        for s in self.samples:
            per_patient[s.patient_id][s.label] += 1
        labels = self.labels
        return {
            "nodules": len(self.samples),
            "benign": int((labels == 0).sum()),
            "malignant": int((labels == 1).sum()),
            "patients": len(per_patient),
            "images": len({s.image_key for s in self.samples}),
            "excluded": len(self.excluded),
            "per_patient": {pid: {"benign": c[0], "malignant": c[1]} for pid, c in sorted(per_patient.items())},
        }


# --- reading the file ---------------------------------------------------------------------------


def read_rows(path: str | Path) -> tuple[list[ManifestRow], list[str]]:
    """Parse the manifest; return its rows and every per-row problem found.

    Raises DatasetError at once only when the file as a whole cannot be used (missing,
    not CSV/JSON, no image column): per-row problems are collected instead.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"manifest not found: {path}")
    records, problems = _read_records(path)
    if not records and not problems:
        raise DatasetError(f"manifest {path} has no rows")
    columns = {k for r in records.values() for k in r}
    if records and "image" not in columns:
        raise DatasetError(f"manifest {path} has no 'image' column; columns found: {show(sorted(columns), 300)}. "
                           "Each row needs image (DICOM folder or volume file), x, y, z, "
                           "coordinate_system, label and patient_id — or image + annotations.")
    rows = []
    for where, record in records.items():
        try:
            rows.append(_parse_row(where, record, path.parent))
        except DatasetError as exc:
            problems.append(str(exc))
    return rows, problems


def _read_records(path: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Rows by where they are (``line N`` / ``item N``), and the rows that cannot be read
    (a CSV row with more or fewer cells than the header, a JSON value that is a list or object)."""
    text = read_text(path, "manifest", DatasetError)
    if path.suffix.lower() == ".json":
        data = parse_json(text, path, "manifest", DatasetError)
        items = data.get("nodules", data.get("rows")) if isinstance(data, dict) else data
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise DatasetError(f"manifest {path}: expected a list of row objects, or {{\"nodules\": [...]}}")
        records, problems = {}, []
        for n, item in enumerate(items):
            nested = sorted(str(k) for k, v in item.items() if isinstance(v, (dict, list)))
            if nested:
                problems.append(f"item {n}: {show(', '.join(nested), 120)} must be a number or text, not a list "
                                "or object")
            else:
                records[f"item {n}"] = _normalise_keys(item)
        return records, problems
    return _csv_records(text, path)


def _csv_records(text: str, path: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    reader = csv.reader(text.splitlines(keepends=True))
    records, problems, last = {}, [], 1
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DatasetError(f"manifest {path} has no header line")
        header = [h.strip().lower() for h in header]
        for values in reader:
            # line numbers as a spreadsheet shows them: the header is line 1
            where, last = f"line {last + 1}", reader.line_num
            if not any(v.strip() for v in values):
                continue
            if fits_header(values, header):
                records[where] = _normalise_keys(dict(zip(header, values)))
            else:
                problems.append(shape_problem(where, values, header, reader.line_num))
    except csv.Error as exc:
        raise DatasetError(f"manifest {path} line {reader.line_num}: {exc} (an unclosed quote?)") from None
    return records, problems


def _normalise_keys(record: dict) -> dict[str, str]:
    return {str(k).strip().lower(): ("" if v is None else str(v).strip())
            for k, v in record.items() if k is not None and str(k).strip()}


def _parse_row(where: str, r: dict[str, str], base: Path) -> ManifestRow:
    def fail(message: str) -> DatasetError:
        return DatasetError(f"{where}: {message}")

    if not r.get("image"):
        raise fail("no image path")
    image = _resolve(r["image"], base, fail)
    annotations = _resolve(r["annotations"], base, fail) if r.get("annotations") else None
    centre_lps = None
    if any(r.get(axis) for axis in "xyz"):
        try:
            xyz = np.array([float(r[axis]) for axis in "xyz"])
        except (KeyError, ValueError):
            raise fail(f"x, y, z must be numbers in mm, got ({show(r.get('x'), 40)}, {show(r.get('y'), 40)}, "
                       f"{show(r.get('z'), 40)})") from None
        if not np.isfinite(xyz).all():
            raise fail(f"x, y, z must be finite, got {xyz.tolist()}")
        system = r.get("coordinate_system", "")
        if not system:
            raise fail("no coordinate_system: say LPS (DICOM/ITK) or RAS (3D Slicer) for each row; "
                       "guessing would put RAS points on the wrong side of the patient")
        try:
            centre_lps = tuple(float(v) for v in to_lps(xyz, system))
        except ValueError as exc:
            raise fail(str(exc)) from None
    elif annotations is None:
        raise fail("give either a centre (x, y, z, coordinate_system) or an annotations file")
    label, excluded = _parse_label(r, fail)
    diameter = None
    if r.get("diameter_mm"):
        try:
            diameter = float(r["diameter_mm"])
        except ValueError:
            raise fail(f"diameter_mm must be a number, got {show(r['diameter_mm'])}") from None
        if not 0 < diameter < np.inf:
            raise fail(f"diameter_mm must be a positive finite number of mm, got {show(r['diameter_mm'])}")
    return ManifestRow(row=where, image=image, series_uid=r.get("series_uid", ""), annotations=annotations,
                       centre_lps=centre_lps, label=label, excluded=excluded,
                       patient_id=r.get("patient_id", ""), nodule_id=r.get("nodule_id", ""),
                       diameter_mm=diameter)


def _parse_label(r: dict[str, str], fail) -> tuple[int | None, str]:
    text = r.get("label", "").lower()
    if text:
        if text in _TRUE_LABELS:
            return 1, ""
        if text in _FALSE_LABELS:
            return 0, ""
        raise fail(f"label {show(r['label'])} is not 0/1 or benign/malignant")
    if r.get("malignancy"):
        from ..annotations import lidc_label

        try:
            rating = float(r["malignancy"])
        except ValueError:
            raise fail(f"malignancy must be a number 1–5, got {show(r['malignancy'])}") from None
        if not 1.0 <= rating <= 5.0:
            raise fail(f"malignancy must be between 1 and 5, got {rating:g}")
        label = lidc_label(rating)
        if label is None:
            return None, f"malignancy {rating:g} is indeterminate under the LIDC rule"
        return int(label), ""
    return None, ""


def _resolve(text: str, base: Path, fail) -> Path:
    if "\x00" in text:
        raise fail(f"path {show(text)} holds a NUL character")
    try:
        p = Path(text).expanduser()
    except RuntimeError as exc:  # ~someone who has no home folder here
        raise fail(f"path {show(text)}: {exc}") from None
    return p if p.is_absolute() else (base / p)


# --- loading images and checking ----------------------------------------------------------------


def load_training_set(path: str | Path, *, keep_images: bool = True,
                      reach_mm: float | None = None) -> tuple[TrainingSet, list[str]]:
    """Load every image once, resolve every nodule and return all problems found.

    Args:
        keep_images: keep the volumes in memory for training; ``dataset check`` drops them.
        reach_mm: if given, keep only the part of each volume within this distance of its
            nodules (the farthest any patch sample can reach), so a cohort of full chest CTs
            fits in memory. Voxels are cropped, never resampled: patches stay identical.
    """
    from ..annotations import load_nodules
    from ..ctio import load_ct

    path = Path(path)
    rows, problems = read_rows(path)
    by_image: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        by_image[row.image_key].append(row)

    samples: list[Sample] = []
    excluded: list[str] = []
    images: dict[str, CTImage] = {}
    for key, image_rows in by_image.items():
        first = image_rows[0]
        where = _rows_text(image_rows)
        if not first.image.exists():
            problems.append(f"{where}: image not found: {first.image}")
            continue
        try:
            image = load_ct(first.image, series_uid=first.series_uid or None)
        except MedLoRAError as exc:
            problems.append(f"{where}: cannot read image {first.image}: {exc}")
            continue
        except (OSError, RuntimeError, ValueError) as exc:  # SimpleITK raises RuntimeError on bad files
            problems.append(f"{where}: cannot read image {first.image}: {type(exc).__name__}: {exc}")
            continue
        image_samples: list[Sample] = []
        for row in image_rows:
            if row.annotations is None:
                if row.excluded:
                    excluded.append(f"{row.row}: {row.excluded}")
                    continue
                if row.label is None:
                    problems.append(f"{row.row}: no label: give label (0/1, benign/malignant) or malignancy 1–5")
                    continue
                if not row.patient_id:
                    problems.append(f"{row.row}: no patient_id; training splits by patient, so every row needs one")
                    continue
                image_samples.append(Sample(key, row.centre_lps, row.label, row.patient_id,
                                            row.nodule_id or f"{row.row}", row.row, row.diameter_mm))
            else:
                image_samples.extend(_samples_from_annotations(row, key, image, load_nodules, problems, excluded))
        usable, location_problems = _location_problems(image_samples, image, first.image)
        problems.extend(location_problems)
        samples.extend(usable)
        if keep_images:
            images[key] = crop_to_reach(image, [s.centre_lps for s in image_samples], reach_mm) if reach_mm else image
    problems.extend(_duplicate_problems(samples))
    problems.extend(_patient_problems(samples))
    labels = {s.label for s in samples}
    if samples and len(labels) < 2:
        only = "malignant" if labels == {1} else "benign"
        problems.append(f"all {len(samples)} usable nodules are {only}: training needs both benign and "
                        "malignant nodules")
    if not samples and not problems:
        problems.append("no usable nodules in the manifest")
    return TrainingSet(manifest=path, samples=samples, images=images, excluded=excluded), problems


def check_training_set(path: str | Path, **kwargs) -> TrainingSet:
    """``load_training_set`` that raises one DatasetError listing every problem."""
    dataset, problems = load_training_set(path, **kwargs)
    if problems:
        raise DatasetError(format_problems(path, problems))
    return dataset


def format_problems(path: str | Path, problems: list[str]) -> str:
    listed = "\n".join(f"  - {p}" for p in problems)
    return f"manifest {path} has {len(problems)} problem(s); fix them before training:\n{listed}"


def _samples_from_annotations(row: ManifestRow, key: str, image: CTImage, load_nodules,
                              problems: list[str], excluded: list[str]) -> list[Sample]:
    if not row.annotations.exists():
        problems.append(f"{row.row}: annotations file not found: {row.annotations}")
        return []
    try:
        nodules = load_nodules(row.annotations, image=image)
    except MedLoRAError as exc:
        problems.append(f"{row.row}: cannot use annotations {row.annotations}: {exc}")
        return []
    if not nodules:
        problems.append(f"{row.row}: annotations {row.annotations} hold no nodule for image {row.image}")
    out = []
    for n, nodule in enumerate(nodules):
        label = row.label if row.label is not None else nodule.label
        name = nodule.nodule_id or f"{row.annotations.name}#{n}"
        where = f"{row.row} ({name})"
        if label is None:
            excluded.append(f"{where}: {row.excluded or _unlabelled_reason(nodule)}")
            continue
        patient = row.patient_id or nodule.case_id or image.ids.patient_id
        if not patient:
            problems.append(f"{where}: no patient_id in the row, the annotations or the image")
            continue
        out.append(Sample(key, nodule.centre_lps, int(label), patient, name, where,
                          row.diameter_mm if row.diameter_mm is not None else nodule.diameter_mm))
    return out


def _unlabelled_reason(nodule) -> str:
    if nodule.ratings:
        from ..annotations import median_malignancy

        return (f"median malignancy {median_malignancy(nodule):g} (ratings {list(nodule.ratings)}) is "
                "indeterminate under the LIDC rule")
    return "the annotations give no malignancy label"


def _location_problems(samples: list[Sample], image: CTImage, image_path: Path) -> tuple[list[Sample], list[str]]:
    """Split samples into usable ones and messages for points outside the CT or in the air
    outside the patient (the importers' check, which also spots swapped RAS/LPS)."""
    from ..annotations import validate_inside
    from ..nodule import Nodule

    usable, problems = [], []
    for s in samples:
        try:
            validate_inside([Nodule(centre_lps=s.centre_lps, nodule_id=s.nodule_id)], image)
            usable.append(s)
        except AnnotationError as exc:
            problems.append(f"{s.row} (image {image_path}): {exc}")
    return usable, problems


def _duplicate_problems(samples: list[Sample]) -> list[str]:
    problems = []
    by_image: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_image[s.image_key].append(s)
    for group in by_image.values():
        centres = np.array([s.centre_lps for s in group])
        for a in range(len(group)):
            d = np.linalg.norm(centres[a + 1:] - centres[a], axis=1)
            for b in np.flatnonzero(d < DUPLICATE_DISTANCE_MM) + a + 1:
                problems.append(f"{group[a].row} and {group[b].row}: duplicate nodule, centres "
                                f"{d[b - a - 1]:.1f} mm apart in the same image; keep one row per nodule")
    return problems


def _patient_problems(samples: list[Sample]) -> list[str]:
    patients_of_image: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        patients_of_image[s.image_key].add(s.patient_id)
    return [f"image {key.split('#')[0]} is assigned to {len(p)} patients ({', '.join(sorted(p))}); "
            "one image belongs to one patient, or the split by patient would leak"
            for key, p in patients_of_image.items() if len(p) > 1]


def _rows_text(rows: list[ManifestRow]) -> str:
    names = [r.row for r in rows]
    return names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more rows)"


# --- memory -------------------------------------------------------------------------------------


def crop_to_reach(image: CTImage, centres_lps: list, reach_mm: float) -> CTImage:
    """The sub-volume holding every voxel within ``reach_mm`` of any centre (plus 2 voxels).

    The voxel grid is kept (same spacing and direction; origin moved to the first kept
    voxel), so trilinear samples inside the reach are exactly those of the full volume.
    """
    if not centres_lps:
        return image
    geometry = image.geometry
    ijk = geometry.lps_to_ijk(np.asarray(centres_lps, dtype=float).reshape(-1, 3))
    # a ball of radius r spans r / spacing voxels along each (orthonormal) axis
    half = reach_mm / np.asarray(geometry.spacing) + 2.0
    size = np.asarray(geometry.size)
    lo = np.clip(np.floor(ijk.min(axis=0) - half), 0, size - 1).astype(int)
    hi = np.clip(np.ceil(ijk.max(axis=0) + half), 0, size - 1).astype(int)
    voxels = np.ascontiguousarray(image.voxels_hu[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1])
    cropped = Geometry(size=tuple(hi - lo + 1), spacing=geometry.spacing,
                       origin_lps=tuple(geometry.ijk_to_lps(lo.astype(float))), direction=geometry.direction)
    return CTImage(voxels_hu=voxels, geometry=cropped, ids=image.ids, source=image.source)
