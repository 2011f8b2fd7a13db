"""Small helpers shared by the importers: CSV reading and value parsing with errors
that name the file, line and column, so a user can fix the file without a traceback."""

from __future__ import annotations

import codecs
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AnnotationError, MedLoRAError


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


def read_text(path: Path, what: str, error: type[MedLoRAError] = AnnotationError) -> str:
    """Read a UTF-8 text file, turning OS and encoding problems into ``error``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{what} path is a folder, not a file: {path}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL character in the path
        raise error(f"cannot read {what} file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        raise error(f"{what} file {path} is not UTF-8: it starts with a UTF-16 byte-order mark (as Excel's "
                    "'Unicode Text' writes); save it as UTF-8 (Excel: 'CSV UTF-8')")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        kind = _image_kind(path, data)
        if kind:
            raise error(f"{path} is {kind}, not a {what} file: give the CT as the volume (--volume / the image "
                        "column) and the points or annotations file here") from None
        raise error(f"{what} file {path} is not UTF-8 text (byte {exc.start} is not valid); "
                    "save it as UTF-8 CSV/JSON/XML") from None


def _image_kind(path: Path, data: bytes) -> str:
    """What binary image file this looks like ("" if none): by its magic bytes, else its extension."""
    if data[128:132] == b"DICM":
        return "a DICOM file"
    if data[:4] == b"NRRD":
        return "an NRRD image"
    if data[:2] == b"\x1f\x8b" or path.suffix.lower() in (".nii", ".gz", ".mha", ".mhd", ".dcm", ".nrrd"):
        return "an image (NIfTI, MetaImage, DICOM or compressed)"
    return ""


def clip(text: str, limit: int = 80) -> str:
    """``text`` shortened to ``limit`` characters, so one bad cell cannot flood a message."""
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def show(value, limit: int = 80) -> str:
    """``repr`` of a value from a file, shortened."""
    return clip(repr(value), limit)


def parse_json(text: str, path: Path, what: str, error: type[MedLoRAError] = AnnotationError):
    """``json.loads`` whose every failure (syntax, nesting, a 5000-digit number) is ``error``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; "
                    "is the file complete?") from None
    except RecursionError:
        raise error(f"{what} file {path} is nested too deeply to be a {what} file") from None
    except ValueError as exc:  # an integer longer than Python's 4300-digit limit
        raise error(f"{what} file {path} holds a value that cannot be read: {exc}") from None


def fits_header(values: list[str], header: list[str]) -> bool:
    """A row fits its header when the cell counts match, apart from empty trailing cells or
    unnamed trailing columns (spreadsheets write both)."""
    if len(values) > len(header):
        return not any(v.strip() for v in values[len(header):])
    return not any(header[len(values):])


def shape_problem(where: str, values: list[str], header: list[str], last_line: int) -> str:
    """Why a row with another number of cells than the header cannot be read safely;
    ``where`` is "FILE line N" and ``last_line`` the line the row ended on."""
    quote = f" (an unclosed quote? the row runs on to line {last_line})" if any("\n" in v for v in values) else ""
    if len(values) > len(header):
        return (f"{where}: {len(values)} cells but the header has {len(header)} columns "
                f"(a stray delimiter, or a comma inside an unquoted value?){quote}")
    missing = clip(", ".join(header[len(values):]), 160)
    return (f"{where}: {len(values)} cell(s) but the header has {len(header)} columns, so it has no "
            f"value for {missing}{quote}; add the missing cells (empty cells need their delimiters too)")


def read_csv(path: Path, what: str, required: tuple[str, ...]) -> tuple[list[str], list[CsvRow]]:
    """Rows of a CSV with a header; blank lines are skipped.

    Raises AnnotationError when the file is empty, has no data rows, lacks a required
    column (all names normalised), or a row has more or fewer cells than the header
    (which would shift or drop values silently).
    """
    text = read_text(path, what)
    if not text.strip():
        raise AnnotationError(f"{what} file {path} is empty: expected a header line and one row per nodule")
    lines = text.splitlines(keepends=True)  # line ends kept: a quoted cell may hold one
    try:
        dialect = csv.Sniffer().sniff(lines[0][:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(lines, dialect)
    rows, header, end = [], None, 0
    try:
        for values in reader:
            start, end = end + 1, reader.line_num
            if header is None:
                header = [normalise_column(c) for c in values]
                missing = [c for c in required if c not in header]
                if missing:
                    raise AnnotationError(f"{what} file {path} lacks column(s) {', '.join(missing)}; "
                                          f"its header is: {show(', '.join(header), 300)}")
                continue
            if not any(v.strip() for v in values):
                continue
            if not fits_header(values, header):
                raise AnnotationError(shape_problem(f"{path} line {start}", values, header, reader.line_num))
            rows.append(CsvRow(start, dict(zip(header, values))))
    except csv.Error as exc:
        raise AnnotationError(f"{path} line {reader.line_num}: {exc} (an unclosed quote?)") from None
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
