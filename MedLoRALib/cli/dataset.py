"""``medlora dataset check MANIFEST``: find every problem in a training manifest before training.

Loads each image once, resolves every nodule and reports all problems together (exit 2),
or prints a per-class and per-patient summary (exit 0). Torch-free.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import DatasetError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["check"], help="check: load every case and report problems")
    parser.add_argument("manifest", help="training manifest (CSV or JSON)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--folds", type=int, help="also check that K-fold cross-validation by patient is possible")
    split.add_argument("--val-fraction", type=float, default=0.2,
                       help="also check that a holdout of this fraction by patient is possible (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split to check (default 0)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from ..training.manifest import format_problems, load_training_set
    from ..training.splits import holdout_split, kfold_splits

    data, problems = load_training_set(args.manifest, keep_images=False)
    if not problems:
        try:
            if args.folds:
                kfold_splits(data.patient_ids, data.labels, args.folds, args.seed)
            else:
                holdout_split(data.patient_ids, data.labels, args.val_fraction, args.seed)
        except DatasetError as exc:
            problems.append(str(exc))
    summary = data.summary()
    if args.json:
        print(json.dumps({**summary, "ok": not problems, "problems": problems, "excluded": data.excluded}, indent=1))
    if problems:
        print(format_problems(args.manifest, problems), file=sys.stderr)
        return 2
    if not args.json:
        _print_summary(summary, data.excluded)
    return 0


def _print_summary(summary: dict, excluded: list[str]) -> None:
    print(f"{summary['nodules']} nodules ({summary['benign']} benign, {summary['malignant']} malignant) "
          f"from {summary['patients']} patients in {summary['images']} images: ready to train.")
    width = max([len("patient")] + [len(p) for p in summary["per_patient"]])
    print(f"\n{'patient':<{width}}  benign  malignant")
    for pid, counts in summary["per_patient"].items():
        print(f"{pid:<{width}}  {counts['benign']:>6}  {counts['malignant']:>9}")
    if excluded:
        print(f"\n{len(excluded)} nodule(s) excluded (no usable label):")
        for line in excluded:
            print(f"  - {line}")
