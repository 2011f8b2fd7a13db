"""``python -m MedLoRALib.report REQUEST.json``: write a DICOM SR of scores in a child process.

For 3D Slicer before 5.12, whose Python has no highdicom (and a pydicom 2 that highdicom would
replace): the module writes the request and runs this in MedLoRA's own environment, as it runs
``medlora serve``. ``-`` reads the request from stdin. The request is one JSON object::

    {"out": "scores.dcm", "series_uid": "1.2...", "study_uid": "1.2...",
     "dicom_files": ["...dcm", ...]  or  "dicom_folder": "...",
     "nodules": [{"nodule_id": "n1", "centre_lps": [x, y, z]}, ...],
     "results": [{"probability": 0.8, "label": "malignant"}, ...],   # the engine's, same order
     "manifest": {...},  "tta": true,  "overwrite": false}

stdout gets one JSON line, ``{"event": "done", "path": ...}`` (exit 0) or ``{"event": "error",
"message": ...}`` (exit 2: bad request or input; the message says what to do).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MedLoRAError
from ..image import StudyIds
from ..nodule import Nodule
from .sr import SeriesRef, SRError, write_score_sr


def write_from_request(request: dict) -> Path:
    """Write the SR a request (see the module docstring) asks for."""
    if not isinstance(request, dict):
        raise SRError("the SR request must be a JSON object")
    missing = [key for key in ("out", "series_uid", "nodules", "results", "manifest") if key not in request]
    if missing:
        raise SRError(f"the SR request lacks {', '.join(missing)}")
    results = request["results"]
    if not isinstance(results, list) or not all(isinstance(item, dict) for item in results):
        raise SRError("the SR request's results must be a list of the engine's result objects")
    try:
        nodules = [Nodule(centre_lps=tuple(item["centre_lps"]), nodule_id=str(item.get("nodule_id", "")))
                   for item in request["nodules"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise SRError(f"the SR request's nodules must each have centre_lps [x, y, z] (LPS mm): {exc}") from exc
    series = SeriesRef(ids=StudyIds(study_uid=str(request.get("study_uid", "")),
                                    series_uid=str(request["series_uid"])),
                       source=str(request.get("dicom_folder", "")))
    return write_score_sr(request["out"], series, nodules, results, request["manifest"],
                          tta=request.get("tta"), dicom_files=request.get("dicom_files"),
                          overwrite=bool(request.get("overwrite", False)))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m MedLoRALib.report REQUEST.json (or - for stdin)", file=sys.stderr)
        return 2
    try:
        text = sys.stdin.read() if args[0] == "-" else Path(args[0]).read_text(encoding="utf-8")
        path = write_from_request(json.loads(text))
    except json.JSONDecodeError as exc:
        event = {"event": "error", "message": f"the SR request is not valid JSON: {exc}"}
    except (MedLoRAError, OSError) as exc:
        event = {"event": "error", "message": str(exc)}
    else:
        event = {"event": "done", "path": str(path)}
    print(json.dumps(event), flush=True)
    return 0 if event["event"] == "done" else 2


if __name__ == "__main__":
    sys.exit(main())
