"""``python -m MedLoRALib.report REQUEST.json`` (or ``-`` for stdin): write a DICOM SR in a child process.

For 3D Slicer before 5.12, whose Python has no highdicom (and a pydicom 2 that highdicom would
replace): Slicer runs this with MedLoRA's own interpreter, as it runs ``medlora serve``. The request
format is in ``report/request.py``. stdout gets one JSON line, ``{"event": "done", "path": ...}``
(exit 0) or ``{"event": "error", "message": ...}`` (exit 2: bad request or input; the message says
what to do).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MedLoRAError
from .request import write_from_request


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
