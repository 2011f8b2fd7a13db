"""``medlora experiment --manifest M --folds 5 --out DIR``: LoRA (q/v, all), full fine-tuning and a linear
probe on the same patient-level folds, one report (``MedLoRALib.experiment``).

Exit codes as ``medlora train``: 0 done (on a helper rank: its jobs done), 2 bad input, 3 stopped
on request (rerun with ``--resume``). Under ``torchrun`` (or with RANK and WORLD_SIZE set by hand)
the processes share the fold × arm jobs; rank 0 writes the report once all are done.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_STOPPED = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..experiment.config import ARMS, DEFAULT_PRESET, PRESETS

    parser.add_argument("--manifest", type=Path, required=True,
                        help="training manifest (e.g. from 'medlora cohort lidc')")
    parser.add_argument("--out", type=Path, required=True,
                        help="experiment folder: new or empty, an earlier one with --resume or --overwrite")
    parser.add_argument("--folds", type=int, default=5, help="folds by patient (default 5)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated arms to train (default all: {','.join(ARMS)})")
    parser.add_argument("--config", dest="preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                        help="backbone and budget: " + "; ".join(f"{k}: {p.backbone}, {p.epochs} epochs, "
                                                                 f"{p.pixels} px" for k, p in PRESETS.items())
                        + f" (default {DEFAULT_PRESET})")
    parser.add_argument("--epochs", type=int, help="most epochs per fold and arm (default: the --config's)")
    parser.add_argument("--batch-size", type=int, help="nodules per step (default: the --config's)")
    parser.add_argument("--pixels", type=int, help="patch edge in pixels (default: the --config's)")
    parser.add_argument("--views", choices=("axial", "ortho3", "multiview9"), default="multiview9",
                        help="planes per nodule (default multiview9)")
    parser.add_argument("--seed", type=int, default=0, help="folds, initialisation and batch order (default 0)")
    parser.add_argument("--weights", type=Path, help="local backbone weights file (.safetensors)")
    parser.add_argument("--random-init", action="store_true",
                        help="a seeded random backbone when no weights are found (tests only: not a pretrained model)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: automatic)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process")
    parser.add_argument("--bootstrap", dest="n_boot", type=int, default=2000,
                        help="bootstrap resamples for the AUC intervals (default 2000)")
    parser.add_argument("--keep-adapters", action="store_true",
                        help="also write each fold × arm model as an adapter (jobs/<fold>-<arm>/adapter)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an experiment in --out: finished folds and arms are kept, a stopped one resumes")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard an earlier experiment in --out (only files medlora experiment wrote)")


def build_config(args: argparse.Namespace):
    from ..experiment.config import ExperimentConfig

    arms = tuple(a.strip() for a in str(args.arms).split(",") if a.strip())
    return ExperimentConfig(manifest=args.manifest, out=args.out, folds=args.folds, arms=arms, preset=args.preset,
                            epochs=args.epochs, batch_size=args.batch_size, pixels=args.pixels, views=args.views,
                            seed=args.seed, weights=args.weights, random_init=args.random_init, device=args.device,
                            threads=args.threads, resume=args.resume, overwrite=args.overwrite,
                            n_boot=args.n_boot, keep_adapters=args.keep_adapters)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..experiment.jobs import JobStopped
    from ..experiment.runner import run_experiment

    try:
        report = run_experiment(build_config(args))
    except JobStopped as exc:
        print(f"medlora experiment: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    if report is not None:
        print(report / "report.md")
    return 0
