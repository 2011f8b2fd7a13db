"""A TCIA download on disk: patient folders, their CT series (headers only) and the LIDC XML reads.

TCIA's downloader writes ``ROOT/<PatientID>/<StudyInstanceUID or study name>/<series>/*.dcm``;
the LIDC readers' XML sits beside the series (``069.xml``) or comes from the separate XML-only
archive (``tcia-lidc-xml/<n>/<m>.xml``). XML files are matched to series by the
``SeriesInstanceUid`` in their ``ResponseHeader``, never by folder. Only DICOM headers are read
(``stop_before_pixels``): the series' grid comes from ``ctio``'s checked header geometry, and the
CT handed to the XML reader is header-only (a zero-stride voxel array, never read).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..ctio import SeriesInfo, list_series, stack_geometry
from ..errors import MedLoRAError
from ..image import CTImage, StudyIds

SCANNER_TAGS = ["Manufacturer", "ManufacturerModelName", "SliceThickness", "PatientID"]


@dataclass
class CTSeries:
    """One CT series of a patient, located by headers; ``image`` is None when it cannot be stacked."""

    patient: str  # the patient folder's name
    folder: Path
    info: SeriesInfo
    image: CTImage | None = None
    problem: str = ""
    scanner: str = "unknown"
    slice_thickness_mm: float | None = None


@dataclass
class PatientFolder:
    name: str
    folder: Path
    series: list[CTSeries] = field(default_factory=list)
    other_series: int = 0  # CR/DX/SR/... series: not CT volumes
    problem: str = ""
    dicom_patient_ids: set[str] = field(default_factory=set)


def patient_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def header_image(info: SeriesInfo, folder: Path) -> CTImage:
    """A CTImage with the series' grid and ids but no voxels (nothing reads them here)."""
    _, geometry = stack_geometry(info, folder)
    voxels = np.broadcast_to(np.int16(0), tuple(reversed(geometry.size)))
    return CTImage(voxels, geometry, StudyIds(info.patient_id, info.study_uid, info.uid), source=str(folder))


def _scanner(info: SeriesInfo) -> tuple[str, float | None]:
    import pydicom

    ds = pydicom.dcmread(info.slices[0].path, stop_before_pixels=True, specific_tags=SCANNER_TAGS)
    maker = " ".join(str(ds.get(t, "") or "").strip() for t in ("Manufacturer", "ManufacturerModelName")).strip()
    thickness = ds.get("SliceThickness")
    try:
        thickness = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness = None
    return maker or "unknown", thickness


def read_patient(folder: Path) -> PatientFolder:
    """Every series of one patient folder, CT series stacked from their headers."""
    patient = PatientFolder(folder.name, folder)
    try:
        series = list_series(folder)
    except MedLoRAError as exc:
        patient.problem = f"its DICOM files cannot be read: {exc}"
        return patient
    for info in series:
        if not info.is_ct_volume:
            patient.other_series += 1
            continue
        patient.dicom_patient_ids.add(info.patient_id)
        found = CTSeries(folder.name, Path(os.path.commonpath([str(s.path.parent) for s in info.slices])), info)
        try:
            found.image = header_image(info, folder)
            found.scanner, found.slice_thickness_mm = _scanner(info)
        except MedLoRAError as exc:
            found.problem = str(exc)
        patient.series.append(found)
    if not patient.series:
        patient.problem = ("no CT series in the folder" + (f" (only {patient.other_series} non-CT series)"
                                                            if patient.other_series else ""))
    return patient


def _xml_series_uid(path: Path) -> str | None:
    """The SeriesInstanceUid of a LIDC CT read (``LidcReadMessage``), None for other XML;
    ValueError naming the problem when the file cannot be parsed."""
    try:
        events = ET.iterparse(path, events=("start", "end"))
        _, root = next(events)
        if root.tag.split("}", 1)[-1] != "LidcReadMessage":
            return None  # e.g. an IdriReadMessage: chest radiograph reads
        for event, element in events:
            tag = element.tag.split("}", 1)[-1]
            if event == "end" and tag == "SeriesInstanceUid":
                return (element.text or "").strip() or None
            if event == "end" and tag == "ResponseHeader":
                return None
    except ET.ParseError as exc:
        raise ValueError(f"malformed XML ({exc}); is the file complete?") from None
    except StopIteration:
        raise ValueError("empty XML file") from None
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
    return None


@dataclass
class XmlIndex:
    """SeriesInstanceUID → the LIDC XML files that read it, and the XML files that could not be read."""

    by_series: dict[str, list[Path]] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)


def index_xml(folders: list[Path]) -> XmlIndex:
    """Every LIDC CT read under ``folders``, by the series it names."""
    index = XmlIndex()
    for top in folders:
        for dirpath, dirnames, filenames in os.walk(top):  # a top that is a symlink is followed
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.lower().endswith(".xml") and not name.startswith("."):
                    path = Path(dirpath) / name
                    try:
                        uid = _xml_series_uid(path)
                    except ValueError as exc:
                        index.unreadable.append(f"{path}: {exc}")
                        continue
                    if uid:
                        index.by_series.setdefault(uid, []).append(path)
    return index
