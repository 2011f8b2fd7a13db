"""``medlora phantom``: write a cohort of synthetic chest CTs with known nodules and a manifest."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..synthetic import PhantomConfig, oblique_direction, write_cohort


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


def run(args: argparse.Namespace) -> int:
    config = replace(PhantomConfig(), size=tuple(args.size), spacing=tuple(args.spacing), n_nodules=args.nodules,
                     direction=oblique_direction() if args.oblique else None)
    manifest = write_cohort(args.out, args.cases, seed=args.seed, config=config, fmt=args.format)
    print(f"wrote {args.cases} synthetic CT(s) with {args.cases * args.nodules} nodules; manifest: {manifest}")
    return 0
