"""``medlora phantom``: write a cohort of synthetic chest CTs with known nodules and a manifest."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

from ..errors import MedLoRAError
from ..synthetic import PhantomConfig, oblique_direction, write_cohort
from ..synthetic.cohort import cohort_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PhantomConfig()
    parser.add_argument("--out", required=True, type=Path, help="folder for the images and manifest.csv")
    parser.add_argument("--cases", type=int, default=12, help="number of phantoms (patients SYN-0001 …)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same cohort")
    parser.add_argument("--format", choices=("nrrd", "dicom"), default="nrrd",
                        help="one NRRD file per case, or one DICOM series folder per case")
    parser.add_argument("--oblique", action="store_true",
                        help="tilt the voxel grid (oblique direction matrix); the anatomy stays upright in LPS")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=defaults.spacing,
                        help="voxel size in mm along i, j, k")
    parser.add_argument("--size", type=int, nargs=3, metavar=("I", "J", "K"), default=defaults.size,
                        help="voxels along i, j, k")
    parser.add_argument("--nodules", type=int, default=defaults.n_nodules, help="nodules per case")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the cohort an earlier 'medlora phantom' wrote in --out (never other files)")


def _earlier_cohort(out: Path, overwrite: bool) -> set[str]:
    """The files of an earlier cohort in ``out`` (replaced only with --overwrite); refuse anything else."""
    if out.exists() and not out.is_dir():
        raise MedLoRAError(f"--out {out} is a file; name a new or empty folder for the cohort.")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    ours = cohort_files(out) or set()
    foreign = [name for name in present if name not in ours]
    if foreign:
        raise MedLoRAError(f"--out {out} holds files medlora phantom did not write ({', '.join(foreign[:3])}"
                           f"{' …' if len(foreign) > 3 else ''}); name a new or empty folder.")
    if present and not overwrite:
        raise MedLoRAError(f"--out {out} already holds a synthetic cohort; pass --overwrite to replace it, or name "
                           "another folder.")
    return set(present)


def run(args: argparse.Namespace) -> int:
    config = replace(PhantomConfig(), size=tuple(args.size), spacing=tuple(args.spacing), n_nodules=args.nodules,
                     direction=oblique_direction() if args.oblique else None)
    earlier = _earlier_cohort(args.out, args.overwrite)
    manifest = write_cohort(args.out, args.cases, seed=args.seed, config=config, fmt=args.format)
    for stale in earlier - (cohort_files(args.out) or set()):  # cases of a larger earlier cohort
        path = args.out / stale
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    print(f"wrote {args.cases} synthetic CT(s) with {args.cases * args.nodules} nodules; manifest: {manifest}")
    return 0
