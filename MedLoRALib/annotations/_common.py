"""Small helpers shared by the importers: CSV reading and value parsing with errors
that name the file, line and column, so a user can fix the file without a traceback."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AnnotationError


@dataclass(frozen=True)
class CsvRow:
    """One data row: its 1-based line number in the file and its cells by normalised column."""

    line: int
    cells: dict[str, str]

    def get(self, column: str) -> str:
        return (self.cells.get(column) or "").strip()


def normalise_column(name: str) -> str:
    """Column lookup ignores case, surrounding spaces and a UTF-8 byte-order mark."""
    return name.replace("\ufeff", "").strip().lower()


def read_text(path: Path, what: str) -> str:
    """Read a text file, turning OS and encoding problems into AnnotationErrors."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AnnotationError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise AnnotationError(f"{what} path is a folder, not a file: {path}") from None
    except OSError as exc:
        raise AnnotationError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{what} file {path} is not UTF-8 text (byte {exc.start} is not valid); "
                              "save it as UTF-8 CSV/JSON/XML") from None


def read_csv(path: Path, what: str, required: tuple[str, ...]) -> tuple[list[str], list[CsvRow]]:
    """Rows of a CSV with a header; blank lines are skipped.

    Raises AnnotationError when the file is empty, has no data rows, lacks a required
    column (all names normalised), or a row has more cells than the header.
    """
    text = read_text(path, what)
    if not text.strip():
        raise AnnotationError(f"{what} file {path} is empty: expected a header line and one row per nodule")
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(text.splitlines(), dialect)
    header = [normalise_column(c) for c in next(reader)]
    missing = [c for c in required if c not in header]
    if missing:
        raise AnnotationError(f"{what} file {path} lacks column(s) {', '.join(missing)}; "
                              f"its header is: {', '.join(header)}")
    rows = []
    for line, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue
        if len(values) > len(header):
            raise AnnotationError(f"{path} line {line}: {len(values)} cells but the header has "
                                  f"{len(header)} columns (a stray delimiter?)")
        rows.append(CsvRow(line, dict(zip(header, values))))
    if not rows:
        raise AnnotationError(f"{what} file {path} has a header but no rows: no nodules to read")
    return header, rows


def parse_float(row: CsvRow, column: str, path: Path, required: bool = True) -> float | None:
    """A finite float from a cell, or None for an empty optional cell."""
    text = row.get(column)
    if not text:
        if required:
            raise AnnotationError(f"{path} line {row.line}: column {column!r} is empty")
        return None
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(f"{path} line {row.line}: column {column!r} should be a number, "
                              f"got {text!r}") from None
    if not math.isfinite(value):
        raise AnnotationError(f"{path} line {row.line}: column {column!r} is not finite ({text!r})")
    return value


_LABEL_WORDS = {"0": 0, "1": 1, "benign": 0, "malignant": 1, "b": 0, "m": 1}


def parse_label(text: str) -> int | None:
    """0/1, benign/malignant or B/M (any case) → 0 or 1; empty → None; else ValueError."""
    value = text.strip().lower()
    if not value:
        return None
    if value in ("0.0", "1.0"):
        value = value[0]
    if value not in _LABEL_WORDS:
        raise ValueError(f"label must be 0/1, benign/malignant or B/M, got {text!r}")
    return _LABEL_WORDS[value]


def dicom_positions_by(folder: Path, key_tag: str) -> dict[str, np.ndarray]:
    """``key_tag`` value (e.g. SOPInstanceUID, InstanceNumber) → ImagePositionPatient (LPS mm)
    of every DICOM image under ``folder``; annotation files that name slices need this."""
    import pydicom

    positions: dict[str, np.ndarray] = {}
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=[key_tag, "ImagePositionPatient"])
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
            continue
        key, ipp = ds.get(key_tag), ds.get("ImagePositionPatient")
        if key not in (None, "") and ipp is not None and len(ipp) == 3:
            positions[str(key)] = np.array([float(v) for v in ipp])
    return positions
