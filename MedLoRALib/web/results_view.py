"""What the page shows of scoring: table rows, download and image links, the status line after a failure.

Pure functions from the logic's results (``slicer.results.ScoreRow``, the jobs) to page state;
the app (``app.py``) decides when to show them. The Train tab's pieces are ``training_view.py``.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path

from ..slicer.batch import BatchScoring
from ..slicer.engine_client import EngineError
from ..slicer.training import TrainingJob

#: a job's kind -> (what the status line calls it, the button that starts it again)
_JOB_WORDS = {TrainingJob: ("training", "Train"), BatchScoring: ("batch scoring", "Score all")}
_SCORING_WORDS = ("scoring", "Score")


def row_dict(index: int, row) -> dict:
    """One results-table row as the page shows it (full precision kept for export and tests)."""
    scored = row.probability is not None and not row.error
    return {"index": index, "nodule": row.nodule, "point_id": row.point_id,
            "probability": f"{row.probability:.6f}" if scored else "",
            "label": row.label_name if scored else "", "adapter": row.adapter, "tta": row.tta,
            "ras": "" if math.isnan(row.r) else f"{row.r:.6f} {row.a:.6f} {row.s:.6f}",
            "colour": ("malignant" if row.label == 1 else "benign") if scored else "none",
            "error": row.error, "random_init": row.random_init}


def data_link(path: Path, mime: str) -> str:
    """A file as a ``data:`` address (the batch CSV's download, the thumbnail's image)."""
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def failure_status(job, exc: Exception, engine_running: bool) -> str:
    """The status line once ``job`` failed with ``exc`` (its message goes to the error box).

    The engine found dead while it answered is restarted by the next request, as in Slicer
    (``EngineSetup``), so the line says which button to press; anything else says what failed.
    """
    what, button = _JOB_WORDS.get(type(job), _SCORING_WORDS)
    if isinstance(exc, EngineError) and not engine_running:
        return f"{what} stopped: the scoring engine stopped. Press {button} again to restart it."
    return f"{what} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
