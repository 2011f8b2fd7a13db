"""An SR request as JSON: how a process without highdicom (3D Slicer before 5.12) asks MedLoRA's own
environment to write the SR (``python -m MedLoRALib.report -``, request on stdin).

The request is one JSON object::

    {"out": "scores.dcm", "series_uid": "1.2...", "study_uid": "1.2...",
     "dicom_files": ["...dcm", ...]  or  "dicom_folder": "...",
     "nodules": [{"nodule_id": "n1", "centre_lps": [x, y, z]}, ...],
     "results": [{"probability": 0.8, "label": "malignant", "tta": "rot4"}, ...],   # the engine's, same order
     "manifest": {...},  "tta": true,  "overwrite": false}

Each result's ``"tta"`` (optional) is the test-time augmentation set the engine scored it with; the
request's ``"tta"`` (optional) the score call's setting, used where the results do not say.

An ensemble gives ``"manifest"`` as the list of its members' manifests, and each result also carries
``"spread"``, ``"disagree"`` and ``"members": [{"adapter": "a", "probability": 0.7, "tta": "d8"}, ...]``
(``ScoringEngine.score_ensemble``'s results), as ``write_score_sr`` takes them.

``sr_request`` builds it, ``write_from_request`` carries it out; both sides use this module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..adapters.manifest import AdapterManifest
from ..image import StudyIds
from ..nodule import Nodule
from .sr import SeriesRef, SRError, write_score_sr

_REQUIRED = ("out", "series_uid", "nodules", "results", "manifest")


def child_command(python: str | None = None, request: str | os.PathLike = "-") -> list[str]:
    """The command that writes the SR of a request (a JSON file, or ``-``: stdin); ``python``: MedLoRA's
    interpreter. 3D Slicer passes a file: its process runners cannot close a child's stdin."""
    return [python or sys.executable, "-m", "MedLoRALib.report", str(request)]


def sr_request(out: str | os.PathLike, ids: StudyIds, nodules: Sequence[Nodule], results: Sequence[dict],
               manifest: AdapterManifest | dict | Sequence[AdapterManifest | dict], *,
               dicom_files: Sequence[str | os.PathLike] | None = None,
               dicom_folder: str | os.PathLike | None = None, tta: bool | int | str | None = None,
               overwrite: bool = False) -> dict:
    """The JSON-ready request for ``write_score_sr`` with these arguments (see the module docstring);
    ``manifest`` a list of the members' manifests for an ensemble's results."""
    request = {
        "out": str(out), "series_uid": ids.series_uid, "study_uid": ids.study_uid,
        "nodules": [{"nodule_id": n.nodule_id, "centre_lps": [float(v) for v in n.centre_lps]} for n in nodules],
        "results": [_result(r) for r in results],
        "manifest": [_manifest(m) for m in manifest] if isinstance(manifest, (list, tuple)) else _manifest(manifest),
        "tta": tta, "overwrite": bool(overwrite)}
    if dicom_files is not None:
        request["dicom_files"] = [str(f) for f in dicom_files]
    if dicom_folder is not None:
        request["dicom_folder"] = str(dicom_folder)
    return request


def _manifest(manifest: AdapterManifest | dict) -> dict:
    return manifest.to_dict() if isinstance(manifest, AdapterManifest) else dict(manifest)


def _result(result: dict) -> dict:
    """The JSON of one result: probability, label and TTA set, and an ensemble's spread, disagreement and
    members."""
    item = {"probability": float(result["probability"]), "label": str(result["label"]), **_tta_of(result)}
    if "spread" in result or "members" in result:
        item.update(spread=float(result["spread"]), disagree=bool(result["disagree"]),
                    members=[{"adapter": str(m["adapter"]), "probability": float(m["probability"]), **_tta_of(m)}
                             for m in result["members"]])
    return item


def _tta_of(result: dict) -> dict:
    return {"tta": str(result["tta"])} if result.get("tta") else {}


def write_from_request(request: dict) -> Path:
    """Write the SR a request asks for; a malformed request raises ``SRError``."""
    if not isinstance(request, dict):
        raise SRError("the SR request must be a JSON object")
    missing = [key for key in _REQUIRED if key not in request]
    if missing:
        raise SRError(f"the SR request lacks {', '.join(missing)}")
    results = request["results"]
    if not isinstance(results, list) or not all(isinstance(item, dict) for item in results):
        raise SRError("the SR request's results must be a list of the engine's result objects")
    try:
        nodules = [Nodule(centre_lps=tuple(item["centre_lps"]), nodule_id=str(item.get("nodule_id", "")))
                   for item in request["nodules"]]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SRError(f"the SR request's nodules must each have centre_lps [x, y, z] (LPS mm): {exc}") from exc
    series = SeriesRef(ids=StudyIds(study_uid=str(request.get("study_uid", "")),
                                    series_uid=str(request["series_uid"])),
                       source=str(request.get("dicom_folder", "")))
    return write_score_sr(request["out"], series, nodules, results, request["manifest"],
                          tta=request.get("tta"), dicom_files=request.get("dicom_files"),
                          overwrite=bool(request.get("overwrite", False)))
