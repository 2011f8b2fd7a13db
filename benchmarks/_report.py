"""The benchmarks' one way out: the JSON report printed, and written to ``--out`` when given.

Imported as ``_report`` (a script's own folder is first on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, out: str | Path | None = None) -> int:
    """Print ``report`` as JSON (and write it to ``out``); returns the exit status 0."""
    text = json.dumps(report, indent=2)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0
