"""Malignancy scores as a DICOM Structured Report: a TID 1500 Measurement Report per study.

The SR (Comprehensive 3D SR, written with highdicom) belongs to the CT's study and lists every image
of the scored CT series as evidence. It holds one TID 1410 measurement group per nodule:

* the nodule centre as an SCOORD3D ``POINT`` ("Image Region", geometric purpose "Center") in the
  series' ``FrameOfReferenceUID``. DICOM's patient coordinate system *is* LPS millimetres (+x left,
  +y posterior, +z superior), MedLoRA's internal frame, so ``centre_lps`` is written as it is — no
  flip; a reader in RAS (3D Slicer) negates x and y;
* the malignancy probability as a numeric measurement (DCM 111047 "Probability of cancer") in
  UCUM ``1`` ("no units"): a fraction in [0, 1], the same number as the ``probability`` column of
  ``medlora score``; stored with its full double precision (Floating Point Value);
* the label at the adapter's threshold as a coded qualitative evaluation: SNOMED CT Benign
  (30807003) / Malignant (21594007), other class names as codes of MedLoRA's own scheme
  ``99MEDLORA`` (declared in the Coding Scheme Identification Sequence);
* the algorithm as TID 4019 Algorithm Identification: name (the adapter's name), version (the
  adapter's content id, ``AdapterManifest.version_id``) and parameters
  naming the backbone, its weights' SHA-256, the manifest's SHA-256 (``manifest_sha256``), the
  threshold, temperature, view set and test-time augmentation set (``tta=rot4``; ``tta=none``
  without; the set each result says it was scored with, ``"tta"`` in the engine's results).

An ensemble (``manifest`` a list of several adapters' manifests, ``results`` from
``ScoringEngine.score_ensemble``) is reported in the same groups: the probability is the members'
mean (derivation SCT "Mean"), its spread between members a second "Probability of cancer" with
derivation SCT "Standard Deviation", one "Probability of cancer" per member with that member's own
TID 4019 Algorithm Identification (TID 300 allows one per measurement), and the disagreement as a
qualitative evaluation (``DISAGREE_CONCEPT``: SCT Yes / No). The group's Algorithm Identification
then names the ensemble: its name and version join the members' (``a+b``) and its parameters list
every member with its version and manifest hash.

An adapter trained on a randomly initialised backbone is never passed off as clinical: its
Algorithm Identification carries the parameter ``RANDOM_INIT_PARAMETER``, the series description
says "NOT CLINICAL", and the document is marked PRELIMINARY and UNVERIFIED (every MedLoRA SR is:
no one has verified the machine's output).

The study, series, image and frame-of-reference UIDs and the patient and study attributes come from
the series' own headers (read without pixels), so a CT read from NRRD/NIfTI cannot get an SR.

highdicom is imported only when an SR is built: 3D Slicer bundles it from 5.12 on (highdicom
0.27.0 with pydicom 3.0.2, ``SuperBuild/External_python-dicom-requirements.cmake`` at v5.12.0);
in older Slicer versions the SR is written by a MedLoRA child process.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .. import __version__
from ..adapters.manifest import AdapterManifest
from ..adapters.manifest import manifest_sha256 as manifest_sha256  # one definition; re-exported for importers
from ..atomic import atomic_path
from ..errors import MedLoRAError
from ..image import CTImage, StudyIds
from ..nodule import Nodule
from ..tta import TTAError, check_tta_name, ensemble_tta, member_tta_sets, resolve_tta

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
MANUFACTURER = "MedLoRA"
PRIVATE_SCHEME = "99MEDLORA"
PROBABILITY_UNIT = "1"  # UCUM "no units": the probability is a fraction in [0, 1]
RANDOM_INIT_PARAMETER = "random_init=true: backbone randomly initialised; NOT A CLINICAL RESULT"
LABEL_CONCEPT = ("LABEL", PRIVATE_SCHEME, "Malignancy label at adapter threshold")  # (value, scheme, meaning)
NOT_CLINICAL = "NOT CLINICAL (random-init backbone)"
COORDINATE_PARAMETER = "coordinates: DICOM patient coordinates (LPS) in mm"
DISAGREE_CONCEPT = ("DISAGREE", PRIVATE_SCHEME, "Adapters disagree at their thresholds")
ENSEMBLE_RULE_PARAMETER = ("ensemble: probability = mean of the members' probabilities; spread = their standard "
                           "deviation (ddof=0); disagree = the members' labels at their own thresholds differ; "
                           "label at the mean of their thresholds")
# Type 2 patient/study attributes highdicom copies from the first image; empty when the CT lacks them.
_TYPE2_FROM_EVIDENCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                        "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
_REFERENCE_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
# SNOMED CT codes for MedLoRA's default class names; other names get a code of PRIVATE_SCHEME.
_SNOMED_LABELS = {"benign": ("30807003", "Benign"), "malignant": ("21594007", "Malignant")}


class SRError(MedLoRAError):
    """A DICOM SR cannot be written as asked (no DICOM series, results that do not fit, ...)."""


@dataclass(frozen=True)
class SeriesRef:
    """What an SR needs of the scored CT: its DICOM identifiers and where its files are.

    A ``CTImage`` read from DICOM serves as one (``ids``, ``source`` = its folder); this stands in
    where no voxels are at hand (the SR child process of 3D Slicer before 5.12).
    """

    ids: StudyIds
    source: str = ""


@dataclass(frozen=True)
class SRSettings:
    """What the written SR says about itself.

    Args:
        series_number: SeriesNumber of the new SR series.
        series_description: SeriesDescription; ``NOT_CLINICAL`` goes before it for adapters
            trained on a randomly initialised backbone (first, so the 64-character limit never cuts it).
        institution_name: InstitutionName, if it should be recorded.
    """

    series_number: int = 990
    series_description: str = "MedLoRA nodule malignancy"
    institution_name: str | None = None


TTASetting = Union[bool, int, str, Sequence[str], None]  # a score call's tta, or the set each member used
TTACall = Union[bool, int, str, None]  # a score call's tta (None: not known)


def _tta_text(tta: TTASetting, manifests: Sequence[AdapterManifest]) -> str | None:
    """The set(s) the scores were made with, as ``ensemble_tta`` names them: a score call's ``tta``
    resolved for each adapter (True: its own set), or the set names the members used; None: unknown."""
    if tta is None:
        return None
    if isinstance(tta, (list, tuple)):
        return ensemble_tta([check_tta_name(name) for name in tta])
    return ensemble_tta([resolve_tta(tta, m.default_tta) for m in manifests])


def algorithm_parameters(manifest: AdapterManifest, tta: TTASetting = None) -> list[str]:
    """The Algorithm Parameters (TID 4019) that identify how the scores were made."""
    params = [f"backbone={manifest.backbone}", f"backbone_sha256={manifest.backbone_sha256}",
              f"manifest_sha256={manifest_sha256(manifest)}", f"mode={manifest.mode}",
              f"threshold={float(manifest.threshold)!r}", f"temperature={float(manifest.temperature)!r}",
              f"views={manifest.spec.views}", f"fusion={manifest.fusion}"]
    tta_text = _tta_text(tta, [manifest])
    if tta_text is not None:
        params.append(f"tta={tta_text}")
    params.append(f"medlora_version={__version__}")
    params.append(COORDINATE_PARAMETER)
    if manifest.random_init:
        params.append(RANDOM_INIT_PARAMETER)
    return params


def ensemble_parameters(manifests: Sequence[AdapterManifest], tta: TTASetting = None) -> list[str]:
    """The Algorithm Parameters (TID 4019) of an ensemble: its members and how they were combined."""
    first = manifests[0]
    params = [f"members={','.join(m.name for m in manifests)}",
              *(f"member {m.name}: version={m.version_id} manifest_sha256={manifest_sha256(m)} mode={m.mode} "
                f"threshold={float(m.threshold)!r}" for m in manifests),
              ENSEMBLE_RULE_PARAMETER, f"backbone={first.backbone}", f"backbone_sha256={first.backbone_sha256}",
              f"threshold={sum(float(m.threshold) for m in manifests) / len(manifests)!r}",
              f"views={first.spec.views}"]
    tta_text = _tta_text(tta, manifests)
    if tta_text is not None:
        params.append(f"tta={tta_text}")
    params += [f"medlora_version={__version__}", COORDINATE_PARAMETER]
    if any(m.random_init for m in manifests):
        params.append(RANDOM_INIT_PARAMETER)
    return params


# --------------------------------------------------------------------------------------------
# The CT series' headers
# --------------------------------------------------------------------------------------------
def _volume_name(ct: CTImage | SeriesRef) -> str:
    return Path(ct.source).name if ct.source else "the volume"


def _series_files(ct: CTImage | SeriesRef, dicom_files: Sequence[str | os.PathLike] | None) -> list[Path]:
    """The files of the CT's series: those given, or the slices ctio read from ``ct.source``."""
    if dicom_files is not None:
        return [Path(f) for f in dicom_files]
    from ..ctio import list_series, series_key

    folder = Path(ct.source) if ct.source else None
    if folder is None or not folder.is_dir():
        raise SRError(f"the DICOM series of this CT (key {series_key(ct.ids.series_uid)}) is no longer at "
                      f"{ct.source or 'its recorded place'}: a DICOM SR needs its files' headers. Load the CT "
                      "again from its DICOM folder, or pass the series' files.")
    found = [s for s in list_series(folder) if s.uid == ct.ids.series_uid]
    if not found or not found[0].slices:
        raise SRError(f"{folder} no longer holds the CT's series (key {series_key(ct.ids.series_uid)}); "
                      "load the CT again from its DICOM folder.")
    return [s.path for s in found[0].slices]


def sr_available() -> bool:
    """Whether this Python can write an SR (has highdicom): 3D Slicer 5.12+ and MedLoRA's own environment."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return False
    return True


def require_highdicom() -> None:
    if not sr_available():
        raise SRError("writing a DICOM SR needs the highdicom package, which this Python lacks (3D Slicer bundles it "
                      "from 5.12 on). Write the SR with MedLoRA's own environment instead: `medlora score ... --sr "
                      "OUT.dcm`, or `python -m MedLoRALib.report REQUEST.json`.")


def require_dicom_origin(ct: CTImage | SeriesRef) -> None:
    """Refuse a CT that was not read from DICOM (cheap: call it before scoring)."""
    if not ct.ids.series_uid:
        raise SRError(f"a DICOM SR refers to the CT's DICOM series (study, series, image and frame-of-reference "
                      f"UIDs), but {_volume_name(ct)} was not read from DICOM and has none. Load the CT from its "
                      "DICOM series (--volume DICOM_FOLDER; in 3D Slicer, through the DICOM module) to write an SR; "
                      "NRRD and NIfTI volumes cannot be referenced.")


def read_series_headers(ct: CTImage | SeriesRef, dicom_files: Sequence[str | os.PathLike] | None = None) -> list:
    """Headers (no pixels) of every image of the CT's DICOM series, checked to belong to it.

    Args:
        ct: a CT read from DICOM (``ctio.load_ct`` on a DICOM folder or file).
        dicom_files: the series' files, when ``ct.source`` is not its folder (e.g. 3D Slicer's
            DICOM database: ``slicer.dicomDatabase.filesForSeries(uid)``); files of other series
            are ignored.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from ..ctio import series_key

    require_dicom_origin(ct)
    key = series_key(ct.ids.series_uid)
    headers = []
    for path in _series_files(ct, dicom_files):
        # the first image gives the patient and study modules; the others only their references
        tags = None if not headers else list(_REFERENCE_TAGS)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except InvalidDicomError:
            continue  # not DICOM (a reader's XML beside the series, ...)
        except Exception as exc:  # pydicom raises many types on corrupt headers
            raise SRError(f"cannot read the DICOM header of {path.name} (series key {key}): "
                          f"{type(exc).__name__}: {exc}") from exc
        if str(ds.get("SeriesInstanceUID", "")) == ct.ids.series_uid:
            headers.append(ds)
    if not headers:
        raise SRError(f"none of the given files belongs to the CT's series (key {key}); pass the series' files.")
    problems = []
    for name in _REFERENCE_TAGS:
        if any(not str(ds.get(name, "") or "") for ds in headers):
            problems.append(f"some images have no {name}")
    frames = {str(ds.get("FrameOfReferenceUID", "")) for ds in headers}
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in headers}
    if len(frames) > 1:
        problems.append(f"its images lie in {len(frames)} frames of reference")
    if len(studies) > 1 or (ct.ids.study_uid and studies != {ct.ids.study_uid}):
        problems.append("its images do not all belong to the CT's study")
    if len({str(ds.SOPInstanceUID) for ds in headers if "SOPInstanceUID" in ds}) != len(headers):
        problems.append("two images share a SOPInstanceUID")
    if problems:
        raise SRError(f"the CT's DICOM series (key {key}) cannot be referenced by an SR: {'; '.join(problems)}.")
    return headers


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def _checked_results(nodules: Sequence[Nodule], results: Sequence[dict],
                     manifest: AdapterManifest) -> list[tuple[Nodule, float, str]]:
    """(nodule, probability, label) per nodule, refusing results that do not belong to the nodules."""
    if not nodules:
        raise SRError("no scored nodule to report: an SR needs at least one nodule with a probability.")
    if len(results) != len(nodules):
        raise SRError(f"{len(results)} results for {len(nodules)} nodules: pass one engine result per nodule, "
                      "in the nodules' order.")
    rows = []
    for index, (nodule, result) in enumerate(zip(nodules, results), start=1):
        name = nodule.nodule_id or f"nodule {index}"
        if result.get("nodule_id") not in (None, "", nodule.nodule_id):
            raise SRError(f"result {index} is for nodule {result['nodule_id']!r}, not {name!r}: results must "
                          "follow the nodules' order.")
        centre = result.get("centre_lps")
        if centre is not None and max(abs(float(a) - b) for a, b in zip(centre, nodule.centre_lps)) > 1e-6:
            raise SRError(f"result {index} was scored at {list(centre)} (LPS mm), but {name} is at "
                          f"{list(nodule.centre_lps)}: results must follow the nodules' order.")
        probability = result.get("probability")
        if not isinstance(probability, (int, float)) or not math.isfinite(probability) or not 0 <= probability <= 1:
            raise SRError(f"result {index} ({name}) has no probability in [0, 1] (got {probability!r}).")
        label = str(result.get("label", ""))
        if label not in manifest.label_names:
            raise SRError(f"result {index} ({name}) has label {label!r}, not one of adapter "
                          f"{manifest.name!r}'s classes {manifest.label_names}.")
        rows.append((nodule, float(probability), label))
    return rows


def _manifest(manifest: AdapterManifest | dict) -> AdapterManifest:
    if isinstance(manifest, AdapterManifest):
        return manifest
    return AdapterManifest.from_dict(manifest, "the adapter manifest given for the SR")


Manifests = Union[AdapterManifest, dict, Sequence[Union[AdapterManifest, dict]]]  # one adapter, or an ensemble


def _members(manifest) -> list[AdapterManifest]:
    """One adapter's manifest, or an ensemble's (a list), as a list; an ensemble is checked to be one."""
    if isinstance(manifest, (list, tuple)):
        members = [_manifest(m) for m in manifest]
        if len(members) > 1:
            from ..ensemble import check_compatible

            check_compatible({m.name: m for m in members})
        if not members:
            raise SRError("no adapter manifest given for the SR")
        return members
    return [_manifest(manifest)]


def _member_tta_sets(results: Sequence[dict], members: Sequence[AdapterManifest],
                     tta: TTACall) -> list[str] | None:
    """The TTA set each member scored with: the one its results record (the engine's ``"tta"``; an ensemble's
    result's own ``"tta"`` where its members' lack it), else the ``tta`` setting resolved for it; None when
    neither says (then the SR records no set)."""
    try:
        per_result = [_recorded_tta(result, len(members)) for result in results]
        sets = []
        for index, member in enumerate(members):
            recorded = {found[index] for found in per_result} - {None}
            if len(recorded) > 1:
                raise SRError(f"the results of adapter {member.name!r} were scored with different test-time "
                              f"augmentation sets ({', '.join(sorted(recorded))}): score them in one call.")
            sets.append(recorded.pop() if recorded else None if tta is None else resolve_tta(tta, member.default_tta))
    except TTAError as exc:
        raise SRError(f"the results' test-time augmentation: {exc}") from None
    return None if None in sets else sets


def _recorded_tta(result: dict, members: int) -> list[str | None]:
    """The set each member's part of ``result`` records (None: not recorded)."""
    if members == 1:
        return [None if result.get("tta") is None else check_tta_name(result["tta"])]
    own = [m.get("tta") for m in result["members"]]
    if all(name is None for name in own) and result.get("tta") is not None:
        return member_tta_sets(result["tta"], members)
    return [None if name is None else check_tta_name(name) for name in own]


def _finite_fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def _checked_ensemble(results: Sequence[dict], members: Sequence[AdapterManifest]) -> list[tuple[float, bool, list]]:
    """(spread, disagree, member probabilities) per result of ``ScoringEngine.score_ensemble``."""
    names = [m.name for m in members]
    rows = []
    for index, result in enumerate(results, start=1):
        spread, disagree, got = result.get("spread"), result.get("disagree"), result.get("members")
        if not _finite_fraction(spread) or not isinstance(disagree, bool):
            raise SRError(f"result {index} is not an ensemble result (needs spread in [0, 1] and disagree true/false; "
                          f"got {spread!r}, {disagree!r}): score with ScoringEngine.score_ensemble.")
        if not isinstance(got, list) or [m.get("adapter") if isinstance(m, dict) else None for m in got] != names:
            raise SRError(f"result {index}'s members are not the adapters {names} in that order.")
        probabilities = [m.get("probability") for m in got]
        if not all(_finite_fraction(p) for p in probabilities):
            raise SRError(f"result {index} has a member without a probability in [0, 1] ({probabilities!r}).")
        rows.append((float(spread), disagree, [float(p) for p in probabilities]))
    return rows


# --------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------
def _label_code(label: str):
    from highdicom.sr import CodedConcept

    if label.lower() in _SNOMED_LABELS:
        value, meaning = _SNOMED_LABELS[label.lower()]
        return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)
    value = "C" + hashlib.sha1(label.encode("utf-8")).hexdigest()[:10]  # SH: at most 16 characters
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=label[:64])


def _private_scheme_item():
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "MedLoRA local codes"
    item.CodingSchemeResponsibleOrganization = "MedLoRA"
    return item


def _ensemble_items(spread: float, disagree: bool, probabilities: Sequence[float], member_algorithms: Sequence):
    """An ensemble's measurements and evaluation beside its mean probability (see the module docstring)."""
    from highdicom.sr import CodedConcept, Measurement, QualitativeEvaluation
    from pydicom.sr.codedict import codes

    unit = CodedConcept(PROBABILITY_UNIT, "UCUM", "no units")
    measurements = [Measurement(name=codes.DCM.ProbabilityOfCancer, value=spread, unit=unit,
                                derivation=codes.SCT.StandardDeviation)]
    measurements += [Measurement(name=codes.DCM.ProbabilityOfCancer, value=p, unit=unit, algorithm_id=algorithm)
                     for p, algorithm in zip(probabilities, member_algorithms)]
    evaluation = QualitativeEvaluation(name=CodedConcept(*DISAGREE_CONCEPT),
                                       value=codes.SCT.Yes if disagree else codes.SCT.No)
    return measurements, [evaluation]


def _measurement_group(nodule: Nodule, index: int, probability: float, label: str, frame_uid: str,
                       algorithm, tracking_seed: Sequence[str], ensemble: tuple | None = None):
    import numpy as np
    from highdicom.sr import (
        CodedConcept,
        FindingSite,
        GraphicTypeValues3D,
        ImageRegion3D,
        Measurement,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    tracking = TrackingIdentifier(
        uid=generate_uid(prefix=None, entropy_srcs=[*tracking_seed, nodule.nodule_id or str(index)]),
        identifier=nodule.nodule_id or f"nodule {index}")
    region = ImageRegion3D(graphic_type=GraphicTypeValues3D.POINT,
                           graphic_data=np.array([nodule.centre_lps], dtype=float),
                           frame_of_reference_uid=frame_uid)
    probability_item = Measurement(name=codes.DCM.ProbabilityOfCancer, value=probability,
                                   unit=CodedConcept(PROBABILITY_UNIT, "UCUM", "no units"),
                                   derivation=codes.SCT.Mean if ensemble else None)
    label_item = QualitativeEvaluation(
        name=CodedConcept(*LABEL_CONCEPT),
        value=_label_code(label))
    more_measurements, more_evaluations = _ensemble_items(*ensemble) if ensemble else ([], [])
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_region=region, finding_type=codes.SCT.Nodule,
        finding_sites=[FindingSite(codes.SCT.Lung)], algorithm_id=algorithm,
        measurements=[probability_item, *more_measurements], qualitative_evaluations=[label_item, *more_evaluations],
        geometric_purpose=codes.DCM.Center)


#: highdicom's warning for a person name without a caret (``highdicom.valuerep.check_person_name``).
PERSON_NAME_WARNING = r'The string ".*" is unlikely to represent the intended person name'


@contextmanager
def _quiet_highdicom() -> Iterator[None]:
    """highdicom logs every module it copies at INFO; the CLI's log would drown in it.

    It also warns, on every SR, when the CT's PatientName (or ReferringPhysicianName) has one
    component (``SYN-0001``, many anonymised series): the SR copies the name from the CT as it
    is, as it must, so the warning is about the user's data, not something to act on here. Only
    that warning is silenced; every other highdicom warning still shows.
    """
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING, category=UserWarning, module="highdicom")
            yield
    finally:
        logger.setLevel(level)


def build_score_sr(nodules: Sequence[Nodule], results: Sequence[dict], manifest: Manifests,
                   headers: Sequence, *, tta: TTACall = None, settings: SRSettings | None = None):
    """The SR as a ``highdicom.sr.Comprehensive3DSR`` (see the module docstring for its content).

    Args:
        nodules: the scored nodules, centres in LPS mm.
        results: one ``ScoringEngine.score``/``score_patches`` result per nodule, same order.
        manifest: the adapter's manifest (object, or its dict as the engine returns it), or a list of
            the members' manifests for ensemble results (``ScoringEngine.score_ensemble``).
        headers: ``read_series_headers(ct)``.
        tta: the score call's test-time augmentation (True: each adapter's own set, False, a count or a
            set name); recorded as the set name, unless the results record theirs (``"tta"``).
        settings: series number and description.
    """
    require_highdicom()
    from highdicom import UID
    from highdicom.sr import (
        AlgorithmIdentification,
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        MeasurementReport,
        ObservationContext,
        ObserverContext,
    )
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    members = _members(manifest)
    manifest = members[0]
    settings = settings or SRSettings()
    rows = _checked_results(nodules, results, manifest)
    ensemble = _checked_ensemble(results, members) if len(members) > 1 else None
    if not headers:
        raise SRError("no DICOM headers of the CT's series were given; read them with read_series_headers(ct).")
    first = headers[0].copy()
    for name in _TYPE2_FROM_EVIDENCE:
        if name not in first:
            setattr(first, name, "")
    evidence = [first, *headers[1:]]
    frame_uid = str(first.FrameOfReferenceUID)

    name, version = "+".join(m.name for m in members), "+".join(m.version_id for m in members)
    sets = _member_tta_sets(results, members, tta)
    algorithm = AlgorithmIdentification(name=name, version=version, parameters=(
        ensemble_parameters(members, sets) if ensemble else algorithm_parameters(manifest, sets)))
    member_algorithms = [AlgorithmIdentification(name=m.name, version=m.version_id,
                                                 parameters=algorithm_parameters(m, sets and sets[i:i + 1]))
                         for i, m in enumerate(members)]
    device = DeviceObserverIdentifyingAttributes(
        uid=generate_uid(prefix=None, entropy_srcs=["MedLoRA", name, version]),
        name=f"MedLoRA {__version__}", manufacturer_name=MANUFACTURER, model_name=name[:64])
    context = ObservationContext(observer_device_context=ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=device))
    seed = [str(first.StudyInstanceUID), str(first.SeriesInstanceUID), version]
    groups = [_measurement_group(nodule, index, probability, label, frame_uid, algorithm, seed,
                                 (*ensemble[index - 1], member_algorithms) if ensemble else None)
              for index, (nodule, probability, label) in enumerate(rows, start=1)]
    report = MeasurementReport(observation_context=context, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                               imaging_measurements=groups)
    description = settings.series_description
    if any(m.random_init for m in members):
        description = f"{NOT_CLINICAL} - {description}"
    sr = Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=UID(), series_number=settings.series_number,
        sop_instance_uid=UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False,
        is_verified=False, institution_name=settings.institution_name, series_description=description[:64])
    sr.SoftwareVersions = __version__
    sr.CodingSchemeIdentificationSequence = [_private_scheme_item()]
    return sr


def check_sr_output(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse to replace anything but a MedLoRA SR, and that only with ``overwrite`` (cheap: call it
    before scoring)."""
    out = Path(out)
    if out.is_dir():
        raise SRError(f"{out} is a folder; name the SR file to write (e.g. {out / 'medlora-sr.dcm'}).")
    if not out.exists():
        return
    if not overwrite:
        raise SRError(f"{out} already exists; choose another name, or pass --overwrite to replace an SR "
                      "MedLoRA wrote earlier.")
    import pydicom

    try:
        ds = pydicom.dcmread(out, stop_before_pixels=True, specific_tags=["SOPClassUID", "Manufacturer"])
        ours = str(ds.get("SOPClassUID", "")) == COMPREHENSIVE_3D_SR and ds.get("Manufacturer") == MANUFACTURER
    except Exception:  # not DICOM at all
        ours = False
    if not ours:
        raise SRError(f"{out} exists and is not an SR written by MedLoRA; it is left untouched. Choose another "
                      "file name.")


def write_score_sr(out: str | os.PathLike, ct: CTImage | SeriesRef, nodules: Sequence[Nodule], results: Sequence[dict],
                   manifest: Manifests, *, tta: TTACall = None,
                   dicom_files: Sequence[str | os.PathLike] | None = None, overwrite: bool = False,
                   settings: SRSettings | None = None) -> Path:
    """Write the scores of one study's nodules as a DICOM SR file (atomically).

    Args:
        out: the ``.dcm`` file to write. An existing file is replaced only with ``overwrite`` and
            only when it is an SR MedLoRA wrote.
        ct: the scored CT, read from DICOM (``ctio.load_ct``); its series' headers are read
            from ``ct.source`` (or ``dicom_files``). A CT from NRRD/NIfTI raises ``SRError``.
        nodules: the scored nodules (centres in LPS mm), in the order of ``results``.
        results: the engine's result per nodule (``probability``, ``label``; ``nodule_id`` and
            ``centre_lps`` are checked against the nodules when present).
        manifest: the adapter's manifest (``engine.manifest()``, or its dict); for an ensemble's results
            (``engine.score_ensemble``), the list of its members' manifests, in the members' order.
        tta: the score call's test-time augmentation (see ``build_score_sr``); the algorithm parameters
            record the set used (``tta=rot4``).
        dicom_files: the series' files when ``ct.source`` is not its folder.
        settings: series number and description of the SR.

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    require_highdicom()
    check_sr_output(out, overwrite)
    members = _members(manifest)
    _checked_results(nodules, results, members[0])  # before the headers: bad results fail fast
    if len(members) > 1:
        _checked_ensemble(results, members)
    _member_tta_sets(results, members, tta)
    headers = read_series_headers(ct, dicom_files)
    with _quiet_highdicom():
        sr = build_score_sr(nodules, results, manifest, headers, tta=tta, settings=settings)
    with atomic_path(out) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return out
