"""``medlora phantom``: write a cohort of synthetic chest CTs with known nodules and a manifest."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..errors import MedLoRAError, explain_os_error
from ..outputs import FolderOutput
from ..synthetic import PhantomConfig, oblique_direction, write_cohort
from ..synthetic.cohort import cohort_files


def _three(values) -> str:
    return " ".join(f"{v:g}" for v in values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PhantomConfig()
    parser.add_argument("--out", required=True, type=Path, help="folder for the images and manifest.csv")
    parser.add_argument("--cases", type=int, default=12, help="number of phantoms (patients SYN-0001 …; default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same cohort (default %(default)s)")
    parser.add_argument("--format", choices=("nrrd", "dicom"), default="nrrd",
                        help="one NRRD file per case, or one DICOM series folder per case (default %(default)s)")
    parser.add_argument("--oblique", action="store_true",
                        help="tilt the voxel grid (oblique direction matrix); the anatomy stays upright in LPS (default: "
                             "axis-aligned)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=defaults.spacing,
                        help=f"voxel size in mm along i, j, k (default {_three(defaults.spacing)})")
    parser.add_argument("--size", type=int, nargs=3, metavar=("I", "J", "K"), default=defaults.size,
                        help=f"voxels along i, j, k (default {_three(defaults.size)})")
    parser.add_argument("--nodules", type=int, default=defaults.n_nodules, help="nodules per case (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the cohort an earlier 'medlora phantom' wrote in --out (never other files)")


# The cohort folder is written as a whole, as crop and explain write theirs: into a staging folder
# that replaces --out only when every case and the manifest are there, so a failed run leaves no
# empty or half-written folder, and never a folder holding files phantom did not write.
PHANTOM_OUTPUT = FolderOutput(command="phantom", index_name="manifest.csv", listed=cohort_files, contents="images",
                              folders=True)


def run(args: argparse.Namespace) -> int:
    config = replace(PhantomConfig(), size=tuple(args.size), spacing=tuple(args.spacing), n_nodules=args.nodules,
                     direction=oblique_direction() if args.oblique else None)
    out = Path(args.out)
    try:
        with PHANTOM_OUTPUT.writing(out, args.overwrite) as staging:
            write_cohort(staging, args.cases, seed=args.seed, config=config, fmt=args.format)
    except OSError as exc:
        raise MedLoRAError(f"could not write the cohort: {explain_os_error(exc, exc.filename or out, '--out')}. "
                           f"Nothing in {out} was changed.") from exc
    print(f"wrote {args.cases} synthetic CT(s) with {args.cases * args.nodules} nodules; manifest: "
          f"{out / 'manifest.csv'}")
    return 0
