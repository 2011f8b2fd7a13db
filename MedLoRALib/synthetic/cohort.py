"""A training cohort of phantoms: one image per case and a manifest (the points-CSV format, LPS)."""

from __future__ import annotations

import csv
import os
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from ..atomic import atomic_path
from ..errors import MedLoRAError
from .config import PhantomConfig
from .phantom import make_phantom
from .series import write_dicom_series

MANIFEST_COLUMNS = ("image", "x", "y", "z", "coordinate_system", "label", "patient_id", "nodule_id", "diameter_mm")


def write_cohort(out_dir: str | os.PathLike, n_cases: int, seed: int = 0, *, config: PhantomConfig | None = None,
                 fmt: Literal["nrrd", "dicom"] = "nrrd") -> Path:
    """Write ``n_cases`` phantoms (patients SYN-0001 …) and a training manifest; return its path.

    Labels are balanced over the whole cohort (half malignant, rounded down). The manifest
    (``manifest.csv``: image relative to it, LPS centres, label, ids, diameter) is written last,
    so its presence means the cohort is complete.
    """
    if n_cases < 1:
        raise MedLoRAError(f"a cohort needs at least one case, got {n_cases}")
    if fmt not in ("nrrd", "dicom"):
        raise MedLoRAError(f"unknown cohort format {fmt!r}: use 'nrrd' or 'dicom'")
    from ..ctio import save_volume

    config = config or PhantomConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    streams = np.random.SeedSequence(seed).spawn(n_cases + 1)
    label_rng = np.random.default_rng(streams[0])
    total = n_cases * config.n_nodules
    labels = np.array([1] * (total // 2) + [0] * (total - total // 2))
    label_rng.shuffle(labels)
    rows = []
    for case in range(n_cases):
        case_id = f"SYN-{case + 1:04d}"
        case_seed = int(np.random.default_rng(streams[case + 1]).integers(2**31))
        case_labels = labels[case * config.n_nodules:(case + 1) * config.n_nodules]
        image, nodules = make_phantom(replace(config, seed=case_seed), case_id=case_id, labels=case_labels)
        if fmt == "nrrd":
            relative = f"{case_id}.nrrd"
            save_volume(image, out / relative)
        else:
            relative = case_id
            write_dicom_series(image, out / relative, patient_id=case_id, overwrite=True)
        for nodule in nodules:
            x, y, z = nodule.centre_lps
            rows.append({"image": relative, "x": f"{x:.4f}", "y": f"{y:.4f}", "z": f"{z:.4f}",
                         "coordinate_system": "LPS", "label": nodule.label, "patient_id": case_id,
                         "nodule_id": nodule.nodule_id, "diameter_mm": f"{nodule.diameter_mm:.2f}"})
    manifest = out / "manifest.csv"
    with atomic_path(manifest) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def cohort_files(folder: str | os.PathLike) -> set[str] | None:
    """What an earlier ``write_cohort`` left in ``folder`` (its manifest and the images it lists), or None
    when the folder holds no cohort manifest."""
    manifest = Path(folder) / "manifest.csv"
    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
                return None
            return {row["image"] for row in reader if row.get("image")} | {manifest.name}
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
