"""The training set written from the scene a few slices at a time, so the GUI never waits for it.

A large CT (500 slices of 512×512) is about 260 MB; writing it in one call holds Slicer's
event loop for seconds. ``TrainingSetWriter`` plans the set at once (which volumes, which
labelled points, the manifest rows: cheap) and writes the voxels in ``step`` calls of a
bounded size (``SLICES_BUDGET_BYTES``) as raw NRRD, which SimpleITK reads like any NRRD.
Each image is written under a temporary name and renamed when complete; the manifest
(the project's points CSV, LPS) is written last, so a half-written set is never trained on.
The voxel arrays are views of the volume nodes' own VTK arrays, which they keep alive.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..crops import safe_name
from ..errors import DatasetError
from ..image import CTImage
from .mrml import markups_to_points, volume_to_ct_image

#: One ``step`` writes at most this many bytes, in chunks of ``CHUNK_BYTES``, and stops starting new
#: chunks after ``STEP_BUDGET_S`` (disks differ: a busy one here writes 16 MB in about 150 ms).
SLICES_BUDGET_BYTES = 16 * 2**20
CHUNK_BYTES = 2 * 2**20
STEP_BUDGET_S = 0.04
_NRRD_TYPES = {np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8", np.dtype(np.int16): "short",
               np.dtype(np.uint16): "ushort", np.dtype(np.int32): "int", np.dtype(np.uint32): "uint",
               np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def nrrd_header(image: CTImage) -> bytes:
    """A raw, little-endian NRRD header for the image's LPS grid (voxels in [k, j, i] order)."""
    geometry = image.geometry
    dtype = image.voxels_hu.dtype
    if dtype.newbyteorder("<") not in _NRRD_TYPES and dtype not in _NRRD_TYPES:
        raise DatasetError(f"volume '{image.source}' has voxels of type {dtype}, which MedLoRA cannot train on.")
    columns = np.asarray(geometry.direction) * np.asarray(geometry.spacing)[None, :]  # LPS step per i, j, k
    directions = " ".join("(" + ",".join(f"{v:.17g}" for v in columns[:, axis]) + ")" for axis in range(3))
    origin = "(" + ",".join(f"{v:.17g}" for v in geometry.origin_lps) + ")"
    lines = ["NRRD0004", "# written by MedLoRA (training set from the Slicer scene)",
             f"type: {_NRRD_TYPES[np.dtype(dtype).newbyteorder('=')]}", "dimension: 3",
             "space: left-posterior-superior", f"sizes: {' '.join(str(n) for n in geometry.size)}",
             f"space directions: {directions}", "kinds: domain domain domain", "endian: little",
             "encoding: raw", f"space origin: {origin}", "", ""]
    return "\n".join(lines).encode("ascii")


@dataclass
class _ImageWrite:
    image: CTImage
    path: Path
    next_slice: int = 0

    @property
    def tmp(self) -> Path:
        return self.path.with_name(f".{self.path.name}.partial")


@dataclass
class TrainingSetWriter:
    """Writes the labelled points of ``pairs`` and their volumes to ``folder``; ``step`` until done."""

    folder: Path
    images: list[_ImageWrite] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    manifest: Path | None = None
    _handle: object = None

    @classmethod
    def plan(cls, pairs: list[tuple[object, object]], folder: str | os.PathLike) -> TrainingSetWriter:
        """Check the labels and plan the files, without writing voxels (fast)."""
        folder = Path(folder)
        writer = cls(folder=folder)
        unlabelled = 0
        for volume, markups in pairs:
            points = markups_to_points(markups, case_id=volume.GetName())
            labelled = [p for p in points if p.training_label is not None]
            unlabelled += len(points) - len(labelled)
            if not labelled:
                continue
            image = volume_to_ct_image(volume)
            path = folder / "images" / f"{safe_name(volume.GetName(), 'volume')}-{safe_name(volume.GetID(), 'volume')}.nrrd"
            writer.images.append(_ImageWrite(image=image, path=path))
            for point in labelled:
                x, y, z = point.nodule.centre_lps
                writer.rows.append({"x": f"{x:.4f}", "y": f"{y:.4f}", "z": f"{z:.4f}", "coordinate_system": "LPS",
                                    "nodule_id": point.name, "label": point.training_label,
                                    "patient_id": image.ids.patient_id or volume.GetName(),
                                    "image": f"images/{path.name}"})
        if {row["label"] for row in writer.rows} != {0, 1}:
            have = ", ".join(f"{sum(r['label'] == v for r in writer.rows)} {n}"
                             for v, n in ((0, "benign"), (1, "malignant")))
            raise DatasetError(f"training needs benign and malignant points; the scene has {have} labelled "
                               f"({unlabelled} unlabelled). Label points in the MedLoRA module or write "
                               "'benign'/'malignant' in their description.")
        return writer

    @property
    def total_bytes(self) -> int:
        return sum(w.image.voxels_hu.nbytes for w in self.images)

    @property
    def written_bytes(self) -> int:
        return sum(w.image.voxels_hu[:w.next_slice].nbytes for w in self.images)

    @property
    def done(self) -> bool:
        return self.manifest is not None

    def step(self, budget_bytes: int = SLICES_BUDGET_BYTES, budget_s: float = STEP_BUDGET_S) -> bool:
        """Write up to ``budget_bytes`` more, for about ``budget_s``; True once every file (manifest last) is done."""
        deadline = time.perf_counter() + budget_s
        while True:
            chunk = min(budget_bytes, CHUNK_BYTES)
            if self._write_chunk(chunk):
                return True
            budget_bytes -= chunk
            if budget_bytes <= 0 or time.perf_counter() > deadline:
                return False

    def _write_chunk(self, budget_bytes: int) -> bool:
        if self.manifest is not None:
            return True
        current = next((w for w in self.images if w.next_slice < w.image.voxels_hu.shape[0]), None)
        if current is None:
            self._write_manifest()
            return True
        voxels = current.image.voxels_hu
        if current.next_slice == 0:
            current.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(current.tmp, "wb")  # noqa: SIM115 - kept open across steps
            self._handle.write(nrrd_header(current.image))
        per_slice = max(1, voxels[0].nbytes)
        stop = min(voxels.shape[0], current.next_slice + max(1, budget_bytes // per_slice))
        self._handle.write(np.ascontiguousarray(voxels[current.next_slice:stop], voxels.dtype.newbyteorder("<")))
        current.next_slice = stop
        if stop == voxels.shape[0]:
            self._handle.close()
            self._handle = None
            os.replace(current.tmp, current.path)
        return False

    def _write_manifest(self) -> None:
        manifest = self.folder / "manifest.csv"
        with atomic_path(manifest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        self.manifest = manifest

    def abort(self) -> None:
        """Stop writing and remove the partial image (complete ones stay for a later run)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        for write in self.images:
            write.tmp.unlink(missing_ok=True)

    def write_all(self) -> Path:
        """Write everything now (scripts, tests)."""
        while not self.step():
            pass
        return self.manifest


def write_training_set(pairs: list[tuple[object, object]], folder: str | os.PathLike) -> Path:
    """Write the labelled points and their volumes as a training manifest at once; returns its path."""
    return TrainingSetWriter.plan(pairs, folder).write_all()
