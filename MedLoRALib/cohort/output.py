"""Writing a cohort: the manifest CSV and its summary JSON, atomically, never over foreign files.

An existing manifest or summary is replaced only with ``overwrite=True`` and only when it is one
this command wrote (the manifest's header is ``MANIFEST_COLUMNS``; the summary has
``"medlora_cohort"``): anything else there is someone's file and is left alone.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..atomic import write_json_atomic, write_text_atomic
from ..errors import OutputError
from .lidc import MANIFEST_COLUMNS, Cohort


def summary_path(manifest: str | Path) -> Path:
    """``cohort.csv`` → ``cohort.summary.json`` beside it."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.summary.json")


def _ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            if path.suffix.lower() == ".json":
                return isinstance(data := json.load(handle), dict) and "medlora_cohort" in data
            return handle.readline().strip() == ",".join(MANIFEST_COLUMNS)
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def check_targets(manifest: Path, overwrite: bool) -> None:
    """Refuse before any work when an output exists and may not be replaced."""
    if manifest.suffix.lower() != ".csv":
        raise OutputError(f"--out {manifest}: the manifest is written as CSV; name it *.csv")
    for path in (manifest, summary_path(manifest)):
        if path.is_dir():
            raise OutputError(f"--out: {path} is a folder; name a file")
        if not path.exists():
            continue
        if not _ours(path):
            raise OutputError(f"{path} exists and was not written by 'medlora cohort'; it is left alone. "
                              "Choose another --out.")
        if not overwrite:
            raise OutputError(f"{path} exists (an earlier cohort); pass --overwrite to replace it, "
                              "or choose another --out.")


def write_cohort(cohort: Cohort, manifest: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the manifest and ``<stem>.summary.json``; returns both paths."""
    manifest = Path(manifest)
    check_targets(manifest, overwrite)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(cohort.rows)
    summary = {**cohort.summary, "manifest": str(manifest.absolute())}
    write_json_atomic(summary_path(manifest), summary)
    write_text_atomic(manifest, text.getvalue())
    return manifest, summary_path(manifest)
