"""The experiment folder: what is MedLoRA's in it, when it may be continued or replaced.

Layout (``DIR`` is ``--out``)::

    DIR/.medlora-output        marker, kind "experiment"
    DIR/experiment.json        the settings, the data fingerprint and the folds (patients per fold)
    DIR/jobs/<fold>-<arm>/     one trainer output each: adapter/, events.jsonl, result.json (last)
    DIR/report/                written as a whole once every job is done (report.md, report.json, ...)

Rules, as for the rest of the command line (``outputs``): a folder without the marker, or
another kind's, is never written into; ``--overwrite`` removes only the entries listed above
and refuses when the folder holds anything else; an existing experiment is continued only
with ``--resume`` and only when its settings, data and folds are the same. Torch-free.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_json_atomic
from ..errors import OutputError
from ..outputs import MARKER_NAME, protected_reason, read_marker, write_marker

EXPERIMENT = "experiment"  # marker kind
FORMAT = "medlora-experiment"
STATE_NAME = "experiment.json"
JOBS, REPORT = "jobs", "report"
OWN_ENTRIES = {MARKER_NAME, STATE_NAME, JOBS, REPORT}
_JOB_ENTRY = re.compile(r"^\.?fold\d+-[a-z_]+(\.lock)?$")
_REPORT_STAGING = re.compile(r"^\.report\.experiment-.+$")  # FolderOutput's staging, left by a killed run


@dataclass(frozen=True)
class FolderState:
    """What ``inspect_folder`` found: ``new`` (nothing of ours yet) or ``resume`` (continue it)."""

    action: str
    state: dict | None = None


def read_state(out: Path) -> dict | None:
    try:
        data = json.loads((out / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def _foreign(out: Path) -> list[str]:
    foreign = [p.name for p in out.iterdir() if p.name not in OWN_ENTRIES and not _REPORT_STAGING.match(p.name)]
    jobs = out / JOBS
    if jobs.is_dir():
        foreign += [f"{JOBS}/{p.name}" for p in jobs.iterdir() if not (_JOB_ENTRY.match(p.name))]
    return sorted(foreign)


def _differences(saved: dict, current: dict) -> str:
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return "; ".join(f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now" for k in keys)


def inspect_folder(out: Path, identity: dict, folds: dict, *, resume: bool, overwrite: bool,
                   inputs: list[Path]) -> FolderState:
    """Refuse an --out MedLoRA must not write; say whether to start anew or resume. Reads only."""
    reason = protected_reason(out, inputs)
    if reason:
        raise OutputError(f"--out {out}: MedLoRA will not write an experiment there because {reason}. "
                          "Name a new folder.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; medlora experiment writes a folder. Name a new folder.")
    if not out.exists() or not any(out.iterdir()):
        return FolderState("new")
    marker = read_marker(out)
    if marker is None or marker.get("kind") != EXPERIMENT:
        what = "was not written by MedLoRA" if marker is None else f"holds a MedLoRA {marker.get('kind')!r}"
        raise OutputError(f"--out {out} {what}, so medlora experiment will not write into it (nor delete it "
                          "with --overwrite). Name a new or empty folder.")
    state = read_state(out)
    if overwrite:
        foreign = _foreign(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputError(f"--out {out} holds files medlora experiment did not write ({shown}); --overwrite "
                              "removes only its own, so move those away first or name another folder.")
        return FolderState("new")
    if state is None:
        raise OutputError(f"--out {out} is an experiment folder without a readable {STATE_NAME}; pass --overwrite "
                          "to start it again, or name another folder.")
    if not resume:
        raise OutputError(f"--out {out} already holds an experiment: pass --resume to continue it (finished folds "
                          "and arms are kept), --overwrite to start again, or name another folder.")
    saved = {"identity": state.get("identity"), "folds": state.get("folds")}
    if saved != {"identity": identity, "folds": folds}:
        detail = _differences(state.get("identity") or {}, identity)
        if state.get("folds") != folds:
            detail = (detail + "; " if detail else "") + "the folds (patients per fold) differ: the manifest changed"
        raise OutputError(f"--out {out} holds an experiment made with other settings or data ({detail}). "
                          "Rerun with the same options, --overwrite to start again, or name another folder.")
    return FolderState("resume", state)


def prepare_folder(out: Path, found: FolderState, state: dict) -> None:
    """Create (or clear, for --overwrite) the folder, mark it and record ``state`` (rank 0 only)."""
    if found.action == "new" and out.exists():
        for name in (STATE_NAME, REPORT, JOBS, MARKER_NAME):  # the state first: a half-cleared folder is not resumed
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    (out / JOBS).mkdir(parents=True, exist_ok=True)
    write_marker(out, EXPERIMENT)
    write_json_atomic(out / STATE_NAME, state)
