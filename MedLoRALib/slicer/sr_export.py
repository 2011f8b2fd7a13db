"""Export SR: one volume's scores from the results table as a DICOM SR, written without blocking Slicer.

What the SR refers to comes from how Slicer loaded the volume. Slicer's DICOM module
(``DICOMScalarVolumePlugin.setVolumeNodeProperties``, ``Modules/Scripted/DICOMPlugins/
DICOMScalarVolumePlugin.py`` v5.4.0 to v5.12.3) stores the SOP Instance UIDs of the volume's
images, space-separated, in the node attribute ``DICOM.instanceUIDs``, and the series and study
UIDs in the subject hierarchy (``mrml.dicom_ids``). The files are found through the DICOM
database, ``slicer.dicomDatabase.fileForInstance(uid)`` (``slicer.dicomDatabase`` is set by
``Modules/Scripted/DICOM/DICOM.py``, v5.4.0 on; a ``ctkDICOMDatabase``). A volume without that
attribute — from NRRD/NIfTI, or dragged in as files — has no DICOM origin and gets no SR.

The points are the table's (world RAS at scoring time), taken back through any linear parent
transform of the volume into the volume's own frame, which is the DICOM patient frame (LPS
after flipping x and y). The adapter's manifest comes from the store and must be the version
that scored the rows. Rows scored by an ensemble (``Spread``, ``Disagree`` and one ``P <adapter>``
column per member, ``results.py``) give each member's manifest, checked the same way, and the SR
is the one ``medlora score --sr`` writes for that ensemble (``report.sr``: mean, spread, member
probabilities, disagreement).

highdicom is not in Slicer's Python before 5.12 (``SuperBuild/External_python-dicom-
requirements.cmake``: pydicom 2.4.4 only at v5.10.0; highdicom 0.27.0 from v5.12.0), so the SR
is always written by a child process, ``python -m MedLoRALib.report REQUEST.json``, run with the
engine's interpreter and environment; ``SRExportJob`` follows the job interface of ``jobs.py``.
An existing file is replaced only when it is an SR MedLoRA wrote (``report.sr.check_sr_output``,
checked here before starting and again in the child).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..adapters import AdapterManifest
from ..atomic import sweep_leftovers
from ..errors import MedLoRAError
from ..geometry import ras_to_lps
from ..image import StudyIds
from ..nodule import Nodule
from ..report.request import child_command, sr_request
from ..report.sr import SRError, check_sr_output
from .engine_client import default_python
from .mrml import _vtk_matrix_to_array, dicom_ids, volume_world_ras_from_ijk
from .process import describe_exit
from .results import ScoreRow, read_table

#: Node attribute where Slicer's DICOM scalar volume plugin lists the volume's SOP Instance UIDs.
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
NEEDS_DICOM = "needs the DICOM series: load it through the DICOM module"
DRAIN_WAIT_S = 2.0


class DicomDatabase(Protocol):
    """The one call of Slicer's ``ctkDICOMDatabase`` the export needs."""

    def fileForInstance(self, sopInstanceUID: str) -> str:  # noqa: N802,N803 (CTK's name)
        """The file of an instance, '' when the database does not have it."""


class FolderDicomIndex:
    """``fileForInstance`` over the DICOM files under some folders (headers read once).

    Stands in for Slicer's DICOM database where there is none (slicer-core scripts, tests).
    """

    def __init__(self, *folders: str | os.PathLike) -> None:
        import pydicom

        self._files: dict[str, str] = {}
        for folder in folders:
            for path in sorted(Path(folder).rglob("*")):
                if not path.is_file():
                    continue
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                except Exception:  # not DICOM
                    continue
                uid = str(ds.get("SOPInstanceUID", "") or "")
                if uid:
                    self._files.setdefault(uid, str(path))

    def fileForInstance(self, sopInstanceUID: str) -> str:  # noqa: N802,N803 (CTK's name)
        return self._files.get(sopInstanceUID, "")


def slicer_dicom_database() -> DicomDatabase | None:
    """Slicer's DICOM database (``slicer.dicomDatabase``), or ``None`` outside Slicer's application."""
    import slicer

    if hasattr(slicer, "dicomDatabase"):
        return slicer.dicomDatabase
    return None


@dataclass(frozen=True)
class DicomOrigin:
    """The DICOM series a volume node was loaded from: its identifiers and its images' files."""

    ids: StudyIds
    files: tuple[str, ...]


def dicom_origin(volume_node, database: DicomDatabase | None = None) -> DicomOrigin:
    """The series and files behind a volume loaded through Slicer's DICOM module; ``SRError`` otherwise."""
    if volume_node is None:
        raise SRError("select the scored volume first.")
    name = volume_node.GetName()
    uids = (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    ids = dicom_ids(volume_node)
    if not uids or not ids.series_uid:
        raise SRError(f"a DICOM SR of '{name}' {NEEDS_DICOM} (DICOM button, import the folder, load the series). "
                      "It was not loaded from DICOM (a NRRD or NIfTI file, or images dragged in as files), so "
                      "there is no series for the SR to refer to.")
    unknown = uids.count("Unknown")  # what Slicer writes for an image without SOPInstanceUID
    if unknown:
        raise SRError(f"{unknown} of the {len(uids)} images of '{name}' have no SOPInstanceUID: an SR cannot "
                      "refer to them.")
    if database is None:
        database = slicer_dicom_database()
    if database is None:
        raise SRError(f"no DICOM database to find the files of '{name}' in: open the DICOM module once, or "
                      "(outside Slicer) pass a FolderDicomIndex of the series' folder.")
    files = [database.fileForInstance(uid) or "" for uid in uids]
    lost = [uid for uid, path in zip(uids, files) if not path or not os.path.isfile(path)]
    if lost:
        raise SRError(f"the DICOM database no longer has the files of {len(lost)} of the {len(uids)} images of "
                      f"'{name}' (moved or deleted): import the series into the DICOM database again and reload it.")
    return DicomOrigin(ids=ids, files=tuple(files))


# --------------------------------------------------------------------------------------------
# What the SR says: the volume's scored rows
# --------------------------------------------------------------------------------------------
@dataclass
class ScoredVolume:
    """The scored nodules of one volume, ready for ``sr_request``."""

    nodules: list[Nodule]
    results: list[dict]
    adapter: str
    adapter_version: str
    skipped: list[str] = field(default_factory=list)
    members: list[tuple[str, str]] = field(default_factory=list)  # (adapter, version) each; one for a single adapter


def _local_from_world(volume_node) -> np.ndarray:
    """4×4 from world RAS to the volume's own RAS frame (its DICOM frame): undoes a linear parent transform."""
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return _vtk_matrix_to_array(ijk_to_ras) @ np.linalg.inv(volume_world_ras_from_ijk(volume_node))


def _unique_ids(rows: Sequence[ScoreRow]) -> list[str]:
    """Point names as tracking identifiers; a name used twice gets its point ID (distinct nodules, distinct UIDs)."""
    names = [row.nodule for row in rows]
    return [name if names.count(name) == 1 else f"{name} [{row.point_id}]" for name, row in zip(names, rows)]


def scored_volume(table_node, volume_node) -> ScoredVolume:
    """The rows of ``volume_node`` in a results table that have a score (the others go to ``skipped``)."""
    if table_node is None:
        raise SRError("no results table: score the volume first (Score).")
    name = volume_node.GetName()
    rows = [row for row in read_table(table_node) if row.volume == name]
    if not rows:
        raise SRError(f"'{table_node.GetName()}' has no row of '{name}': score this volume first.")
    def has_score(row: ScoreRow) -> bool:
        return row.probability is not None and not row.error

    scored = [row for row in rows if has_score(row)]
    skipped = [f"'{row.nodule}': {row.error or 'not scored'}" for row in rows if not has_score(row)]
    if not scored:
        raise SRError(f"no point of '{name}' has a score in '{table_node.GetName()}' ({'; '.join(skipped)}).")
    adapters = sorted({(row.adapter, row.adapter_version) for row in scored})
    if len(adapters) > 1:
        raise SRError(f"the rows of '{name}' were scored by {len(adapters)} adapters or versions "
                      f"({', '.join(f'{a} {v}' for a, v in adapters)}): score the volume again with one adapter.")
    local_from_world = _local_from_world(volume_node)
    members = _members(scored[0])
    nodules, results = [], []
    for row, nodule_id in zip(scored, _unique_ids(scored)):
        local_ras = (local_from_world @ np.array([row.r, row.a, row.s, 1.0]))[:3]
        nodules.append(Nodule(centre_lps=tuple(float(v) for v in ras_to_lps(local_ras)), nodule_id=nodule_id,
                              case_id=name, source=f"slicer:{table_node.GetName()}"))
        results.append(_result(row, [member for member, _ in members]))
    [(adapter, version)] = adapters
    return ScoredVolume(nodules=nodules, results=results, adapter=adapter, adapter_version=version, skipped=skipped,
                        members=members)


def _members(row: ScoreRow) -> list[tuple[str, str]]:
    """(adapter, version) of each adapter that scored ``row``: the row's own for a single adapter; for an
    ensemble its members (the row's member probabilities), in the order they were combined (``Adapter``
    joins their names with '+', ``Adapter version`` their versions, ``scoring.ScoringSession``)."""
    if row.spread is None and not row.members:
        return [(row.adapter, row.adapter_version)]
    joined = f"+{row.adapter}+"
    names = sorted(row.members, key=lambda member: joined.find(f"+{member}+"))
    versions = row.adapter_version.split("+")  # version IDs are hex: '+' only joins them
    if row.spread is None or row.disagree is None or len(names) < 2 or "+".join(names) != row.adapter \
            or len(versions) != len(names):
        raise SRError(f"the ensemble row of '{row.nodule}' does not name its members consistently (adapter "
                      f"'{row.adapter}', version '{row.adapter_version}', probabilities of "
                      f"{', '.join(row.members) or 'no member'}, spread and disagree "
                      f"{'' if row.spread is not None and row.disagree is not None else 'not '}set): "
                      "score the volume again, then export.")
    return list(zip(names, versions))


def _result(row: ScoreRow, members: Sequence[str]) -> dict:
    """The engine's result object of a row (an ensemble's with its spread, disagreement and members)."""
    result = {"probability": float(row.probability), "label": row.label_name, **({"tta": row.tta} if row.tta else {})}
    if len(members) > 1:
        missing = [member for member in members if member not in row.members]
        if missing:
            raise SRError(f"the ensemble row of '{row.nodule}' has no probability of {', '.join(missing)}: score "
                          "the volume again, then export.")
        result.update(spread=float(row.spread), disagree=bool(row.disagree),
                      members=[{"adapter": member, "probability": float(row.members[member])} for member in members])
    return result


def scoring_manifest(session, adapter: str, version: str) -> AdapterManifest:
    """The manifest of the adapter version that scored the rows (registered in the session, or in the store)."""
    found = []
    if adapter in session.adapters:
        found.append(AdapterManifest.from_dict(session.adapters[adapter], f"adapter {adapter}"))
    if session.store is not None:
        try:
            found.append(session.store.info(adapter))
        except MedLoRAError:
            pass
    for manifest in found:
        if manifest.version_id == version:
            return manifest
    if found:
        raise SRError(f"adapter '{adapter}' has changed since these scores (version {found[0].version_id}, scored "
                      f"with {version}): score the volume again, then export.")
    raise SRError(f"adapter '{adapter}' that scored these rows is not in the adapter store any more: import it "
                  "again, or score with another adapter.")


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
@dataclass
class SRExportJob:
    """The SR child process of one export; ``poll`` advances it (job interface of ``jobs.py``)."""

    handle: object
    out: Path
    request_file: Path
    volume_name: str
    count: int
    skipped: list[str] = field(default_factory=list)
    written: Path | None = None
    cancelled: bool = False
    _exited_at: float | None = None
    _events: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.written is not None or (self.cancelled and self._exited_at is not None)

    @property
    def progress(self) -> float:
        return 1.0 if self.written is not None else 0.0

    @property
    def status(self) -> str:
        if self.written is not None:
            return (f"DICOM SR of {self.count} nodules of '{self.volume_name}' written to {self.written}"
                    + (f" (left out: {'; '.join(self.skipped)})" if self.skipped else ""))
        if self.cancelled:
            return "SR export cancelled"
        return f"writing the DICOM SR of '{self.volume_name}'…"

    @property
    def results_table(self):
        return None

    def _read(self) -> None:
        for line in self.handle.read_lines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("event") in ("done", "error"):
                self._events.append(event)

    def poll(self) -> bool:
        """Advance without waiting; True once finished. A failed write raises ``SRError``."""
        if self.finished:
            return True
        self._read()
        code = self.handle.poll()
        if code is None:
            return False
        self._exited_at = self._exited_at or time.monotonic()
        if not self.handle.drained() and time.monotonic() - self._exited_at < DRAIN_WAIT_S:
            return False
        self._read()
        self._clean_up()
        event = self._events[-1] if self._events else {}
        if code == 0 and event.get("event") == "done":  # also when Cancel came after the SR was written
            self.written = Path(event.get("path") or self.out)
            return True
        if self.cancelled:
            return True
        raise SRError(self._failure(code, event))

    def _failure(self, code: int, event: dict) -> str:
        message = event.get("message")
        if not message:
            tail = self.handle.stderr_tail().strip().splitlines()
            message = f"the SR writer stopped ({describe_exit(code)}): {tail[-1] if tail else 'no message'}"
        if "highdicom" in message:
            message += (" In 3D Slicer before 5.12, set MedLoRA's engine Python (module settings) to MedLoRA's own "
                        "environment, which has highdicom.")
        return f"DICOM SR of '{self.volume_name}' not written: {message}"

    def _clean_up(self) -> None:
        self.request_file.unlink(missing_ok=True)
        if self.cancelled:
            sweep_leftovers(self.out.parent)  # the killed writer's temporary file

    def cancel(self) -> None:
        """Stop the writer (never waits; poll until ``finished``). The SR appears whole or not at all."""
        if self.finished:
            return
        self.cancelled = True
        self.handle.stop(grace_s=0.0)


def export_request(session, volume_node, table_node, out: Path, overwrite: bool = True,
                   database: DicomDatabase | None = None) -> tuple[dict, ScoredVolume]:
    """Every check of an export, then the child's request (``report.request``) and what it reports."""
    origin = dicom_origin(volume_node, database)
    check_sr_output(out, overwrite)
    scored = scored_volume(table_node, volume_node)
    manifests = [scoring_manifest(session, adapter, version) for adapter, version in scored.members]
    request = sr_request(out, origin.ids, scored.nodules, scored.results,
                         manifests if len(manifests) > 1 else manifests[0], dicom_files=origin.files,
                         overwrite=overwrite)
    return request, scored


def begin_sr_export(session, volume_node, table_node, out: str | os.PathLike, overwrite: bool = True,
                    database: DicomDatabase | None = None) -> SRExportJob:
    """Check everything that can be checked here, then start the SR child process; never waits.

    Args:
        session: the ``ScoringSession`` (its engine's interpreter, environment and runner write the SR;
            its adapters and store give the manifest).
        volume_node: the scored volume, loaded through Slicer's DICOM module.
        table_node: the results table holding its rows.
        out: the ``.dcm`` file. An existing file is replaced only with ``overwrite`` (the save dialog
            has asked) and only when it is an SR MedLoRA wrote.
        database: where the volume's instances are found (default: ``slicer.dicomDatabase``).
    """
    out = Path(out)
    request, scored = export_request(session, volume_node, table_node, out, overwrite, database)
    handle_file, name = tempfile.mkstemp(prefix="medlora-sr-", suffix=".json")
    with os.fdopen(handle_file, "w", encoding="utf-8") as handle:
        json.dump(request, handle)
    config = session.engine.config
    try:
        process = session.runner.start(child_command(config.python or default_python(), name), env=config.env)
    except MedLoRAError:
        Path(name).unlink(missing_ok=True)
        raise
    return SRExportJob(handle=process, out=out, request_file=Path(name), volume_name=volume_node.GetName(),
                       count=len(scored.nodules), skipped=scored.skipped)
