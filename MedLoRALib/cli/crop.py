"""``medlora crop``: cut each nodule's patch from a CT into image files and an index CSV.

The inputs are those of ``medlora score`` (``cli/inputs.py``); the cutting and writing
are ``MedLoRALib.crops``. The output folder appears complete or not at all, and a folder
holding anything crop did not write is refused. Torch-free.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..crops import (
    FORMATS_2D,
    FORMATS_CUBE,
    INDEX_NAME,
    CropJob,
    crop_folder,
    crop_study,
    write_index,
)
from ..errors import AnnotationError, MedLoRAError, explain_os_error
from ..patches import VIEW_PLANES
from .inputs import add_input_arguments, read_inputs

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("--out", required=True,
                        help="output folder: new or empty, or an earlier crop's folder with --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the crops of an earlier run in --out (never files crop did not write)")
    parser.add_argument("--views", choices=(*VIEW_PLANES, "cube"), default="multiview9", help=views_help())
    parser.add_argument("--fov-mm", type=float, default=50.0, help="patch edge in mm (default 50)")
    parser.add_argument("--pixels", type=int, default=64, help="samples along each edge (default 64)")
    parser.add_argument("--window", type=float, nargs=2, default=(-1000.0, 400.0), metavar=("LOW", "HIGH"),
                        help="HU window mapped to 0–255 in PNG and 0–1 in .npy (default -1000 400); "
                             "cube NRRD files keep HU")
    parser.add_argument("--format", choices=sorted({*FORMATS_2D, *FORMATS_CUBE}),
                        help="png or npy for 2D view sets (default png); nrrd or npy for cube (default nrrd)")
    parser.add_argument("--min-readers", type=int, help="LIDC XML: keep nodules marked by at least N readers")


def views_help() -> str:
    """The view sets, from ``patches.VIEW_PLANES`` (the one place that defines them)."""
    sets = [f"{name}: {len(planes)} plane{'s' if len(planes) > 1 else ''} ({', '.join(planes)})"
            for name, planes in VIEW_PLANES.items()]
    return ("which patches to cut through each nodule. " + "; ".join(sets)
            + "; cube: a 3D block of PIXELS³ samples in HU (NRRD or npy). Default multiview9")


def _importer_options(args: argparse.Namespace, fmt: str) -> dict:
    if args.min_readers is None:
        return {}
    if fmt != "lidc":
        raise MedLoRAError("--min-readers applies to LIDC XML reads only")
    return {"min_readers": args.min_readers}


def _crop_all(args: argparse.Namespace, inputs, job: CropJob, options: dict, out: Path) -> list[dict]:
    from tqdm import tqdm

    from ..annotations import load_nodules
    from ..ctio import load_ct

    volume, points = inputs.volume, inputs.points
    if inputs.studies is None:
        ct = load_ct(volume, series_uid=args.series_uid)
        nodules = load_nodules(points, image=ct, fmt=inputs.points_format, **options)
        if not nodules:
            raise AnnotationError(f"{points} has nodules, but none for this CT ({volume.name}): check that the "
                                  "file names this series or image")
        with tqdm(total=len(nodules), desc="nodules", unit="nodule", disable=None) as bar:
            return crop_study(ct, nodules, job, out, volume.name, 1, bar)
    rows: list[dict] = []
    skipped = []
    for study in tqdm(inputs.studies, desc="studies", unit="study", disable=None):
        try:
            ct = load_ct(study.path, series_uid=args.series_uid)
        except MedLoRAError as exc:
            skipped.append(f"{study.name}: {exc}")
            continue
        nodules = load_nodules(points, image=ct, fmt=inputs.points_format, **options)
        if nodules:
            rows += crop_study(ct, nodules, job, out, study.name, len(rows) + 1)
    for line in skipped:
        log.warning("skipped study %s", line)
    if not rows:
        raise AnnotationError(f"no nodule in {points} belongs to any of the {len(inputs.studies)} studies in "
                              f"{volume} ({len(skipped)} could not be read); check the series UIDs / image names")
    return rows


def run(args: argparse.Namespace) -> int:
    file_format = args.format or ("nrrd" if args.views == "cube" else "png")
    job = CropJob(args.views, args.fov_mm, args.pixels, tuple(args.window), file_format,
                  body_check=not args.no_body_check)  # refuses bad settings before any loading
    inputs = read_inputs(args)
    options = _importer_options(args, inputs.points_format)
    out = Path(args.out)
    try:
        with crop_folder(out, overwrite=args.overwrite) as staging:
            rows = _crop_all(args, inputs, job, options, staging)
            write_index(rows, staging / INDEX_NAME)
    except OSError as exc:
        raise MedLoRAError(f"could not write the crops: {explain_os_error(exc, exc.filename or out, '--out')}. "
                           f"Nothing in {out} was changed.") from exc
    print(f"wrote {len(rows)} patch(es) ({job.views}, {job.file_format}) and {INDEX_NAME} to {out}")
    return 0
