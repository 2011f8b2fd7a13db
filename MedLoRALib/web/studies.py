"""The studies open in the page: each CT as a volume node with its own point list, on one MRML scene.

Loading and importing go through the library's own readers (``ctio.load_ct``,
``annotations.load_nodules``) and the Slicer layer's MRML conversions (``slicer.mrml``), so a
point is where it is everywhere else: LPS inside MedLoRA, RAS on the scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..annotations import load_nodules
from ..ctio import load_ct
from ..errors import MedLoRAError
from ..geometry import lps_to_ras
from ..image import CTImage
from ..slicer import mrml


@dataclass
class Study:
    """One open CT: its volume node, the point list linked to it, and the image it came from."""

    name: str
    volume: object
    markups: object
    image: CTImage
    path: Path | None = None  # where it was read from (None: uploaded)


class Studies:
    """Every study open on the scene, by name; one of them is shown."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.by_name: dict[str, Study] = {}
        self.current: str | None = None

    def open(self, path: Path, name: str | None = None) -> Study:
        """Read a CT (DICOM folder, NRRD, NIfTI...) into a new volume node with an empty point list."""
        image = load_ct(path)
        if image.geometry.size[2] < 2:
            raise MedLoRAError(f"'{path.name}' holds a single slice, not a CT volume: open a CT series.")
        base = name or _study_name(path, image)
        name = base
        for n in range(2, 1000):
            if name not in self.by_name:
                break
            name = f"{base} ({n})"
        volume = mrml.add_volume_node(self.scene, image, name=name)
        markups = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{name} nodules")
        markups.CreateDefaultDisplayNodes()
        mrml.link_markups(volume, markups)
        study = Study(name=name, volume=volume, markups=markups, image=image, path=Path(path).resolve())
        self.by_name[name] = study
        self.current = name
        return study

    def get(self, name: str | None = None) -> Study:
        name = name or self.current
        if not name or name not in self.by_name:
            raise MedLoRAError("open a CT first (a DICOM folder, .nrrd or .nii.gz under the data root, or upload one).")
        return self.by_name[name]

    def import_points(self, path: Path, study: Study | None = None) -> int:
        """Add the nodules of a LIDC XML, markups JSON or points CSV to a study's point list.

        A nodule's label (a points CSV's ``label``, LIDC's median malignancy rule) becomes the
        point's training label, as the Slicer module's label buttons set it.
        """
        study = study or self.get()
        nodules = load_nodules(path, image=study.image)
        if not nodules:
            raise MedLoRAError(f"'{path.name}' holds no nodule for {study.name}.")
        for nodule in nodules:
            ras = lps_to_ras(np.asarray(nodule.centre_lps, float))
            index = study.markups.AddControlPointWorld(*ras, nodule.nodule_id or "")
            if nodule.label in (0, 1):
                mrml.set_training_label(study.markups, study.markups.GetNthControlPointID(index), nodule.label)
        return len(nodules)

    def open_folder(self, folder: Path) -> list[Study]:
        """Open every study of a folder of studies (as ``medlora score`` finds them), with their annotations.

        Each study's points come from the annotation files beside it: a LIDC XML or ``.mrk.json``
        inside a DICOM folder, or ``NAME.csv`` / ``NAME.mrk.json`` / ``NAME.xml`` beside ``NAME.nrrd``.
        """
        from ..crops import find_studies

        found = find_studies(folder) or []
        if not found:
            raise MedLoRAError(f"'{folder.name}' is not a folder of studies (subfolders or volume files, one per "
                               "study): open a single study with Open instead.")
        opened = []
        for entry in found:
            path = Path(entry.volume).resolve()
            study = next((s for s in self.by_name.values() if s.path == path), None)  # open already: reused
            if study is None:
                study = self.open(path, name=entry.name.split(".")[0])
            if study.markups.GetNumberOfControlPoints() == 0:
                for annotation in _annotations_of(path):
                    self.import_points(annotation, study)
            opened.append(study)
        return opened

    def delete_point(self, point_id: str, study: Study | None = None) -> None:
        study = study or self.get()
        index = study.markups.GetNthControlPointIndexByID(point_id)
        if index < 0:
            raise MedLoRAError(f"point {point_id} is not in {study.name}: it was deleted already.")
        study.markups.RemoveNthControlPoint(index)


def _study_name(path: Path, image: CTImage) -> str:
    patient = getattr(image.ids, "patient_id", "") or ""
    return patient or path.name.split(".")[0] or "CT"


def _annotations_of(volume: Path) -> list[Path]:
    if volume.is_dir():
        return sorted([*volume.glob("*.xml"), *volume.glob("*.mrk.json")])
    stem = volume.name.split(".")[0]
    return [p for p in (volume.with_name(f"{stem}{ext}") for ext in (".csv", ".mrk.json", ".xml")) if p.is_file()]
