"""The inputs ``medlora crop`` and ``medlora score`` share: one CT or a folder of studies, and its points.

One study: ``--volume`` is a DICOM folder or a volume file and ``--points`` any supported
annotation file. Several studies: ``--volume`` is a folder whose subfolders (or volume
files) are one study each (``crops.find_studies``), and ``--points`` must say which study
each point belongs to. Torch-free.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..crops import Study, find_studies
from ..errors import AnnotationError, MedLoRAError

POINT_FORMATS = ("lidc", "luna16", "nlstx", "markups", "points")


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """``--volume``, ``--points`` and the options that say how to read them."""
    parser.add_argument("--volume", required=True,
                        help="CT: DICOM folder or volume file, or a folder of studies (one per subfolder/file)")
    parser.add_argument("--points", required=True,
                        help="nodule annotations: points CSV, .mrk.json, LIDC XML, LUNA16 or NLSTx CSV")
    parser.add_argument("--points-format", choices=POINT_FORMATS,
                        help="annotation format, when detecting it from the content is not wanted")
    parser.add_argument("--series-uid", help="DICOM series to read when a folder holds several")
    parser.add_argument("--no-body-check", action="store_true",
                        help="do not refuse points that lie in the air outside the patient")


@dataclass
class Inputs:
    """What ``--volume`` and ``--points`` name, checked."""

    volume: Path
    points: Path
    points_format: str
    studies: list[Study] | None  # None: ``volume`` is one study


def check_folder_points(points: Path, fmt: str) -> None:
    """A folder of studies needs points that say which study each belongs to."""
    from ..annotations._common import read_csv

    if fmt in ("lidc", "markups"):
        raise AnnotationError(f"{points} ({fmt}) does not say which study each point belongs to; with a folder "
                              "of studies use a LUNA16 or NLSTx CSV, or a points CSV with an 'image' column")
    if fmt == "points":
        header, rows = read_csv(points, "points", ("x", "y", "z", "coordinate_system"))
        unnamed = [r.line for r in rows if not r.get("image") and not r.get("series_uid")]
        if unnamed:
            raise AnnotationError(f"{points} line {unnamed[0]}: with a folder of studies every row needs an "
                                  "'image' (the study's folder or file, or a folder inside it, relative to the CSV) "
                                  "or a 'series_uid'")


def read_inputs(args: argparse.Namespace) -> Inputs:
    """Check ``--volume`` and ``--points`` before any CT is read or model loaded."""
    from ..annotations import detect_format

    volume, points = Path(args.volume), Path(args.points)
    if not volume.exists():
        raise MedLoRAError(f"--volume {volume} does not exist")
    fmt = args.points_format or detect_format(points)
    studies = find_studies(volume)
    if studies is not None:
        check_folder_points(points, fmt)
    return Inputs(volume, points, fmt, studies)
