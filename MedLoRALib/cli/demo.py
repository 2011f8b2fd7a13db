"""``medlora demo``: synthetic end-to-end run — phantom cohort, LoRA training, held-out scoring, report.

Everything is synthetic and offline; the backbone is MedLoRA's tiny synthetic-CT
pre-trained stand-in (or a seeded random one with ``--random-init``), never a real
large vision model. Re-running with the same ``--out`` reuses what is already there.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo-output"),
                        help="report folder (default demo-output); re-running reuses its cohort and adapter")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run (6 + 2 studies, 1 epoch) to check that everything works")
    parser.add_argument("--cases", type=int, help="phantom studies for training and validation (default 40)")
    parser.add_argument("--heldout-cases", type=int, help="unseen phantom studies to score (default 10)")
    parser.add_argument("--epochs", type=int, help="training epochs (default 20)")
    parser.add_argument("--batch-size", type=int, help="nodules per training step (default 16)")
    parser.add_argument("--targets", choices=["qv", "qkv", "attn", "all"], help="LoRA targets (default qv)")
    parser.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    parser.add_argument("--seed", type=int, help="cohort and training seed (default 0)")
    parser.add_argument("--random-init", action="store_true",
                        help="train on a seeded random backbone instead of the synthetic-CT pre-trained stand-in")
    parser.add_argument("--weights", type=Path, help="the stand-in backbone's weights (default: the shipped file)")
    parser.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                        help="training progress: tqdm bar (default), JSON lines on stdout, or none")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo

    given = {"train_cases": args.cases, "heldout_cases": args.heldout_cases, "epochs": args.epochs,
             "batch_size": args.batch_size, "targets": args.targets, "rank": args.rank, "seed": args.seed,
             "weights": args.weights, "threads": args.threads}
    changes = {k: v for k, v in given.items() if v is not None}
    changes.update(random_init=args.random_init, progress=args.progress)
    config = DemoConfig.quick(args.out, **changes) if args.quick else DemoConfig(out=args.out, **changes)
    run_demo(config)
    return 0
