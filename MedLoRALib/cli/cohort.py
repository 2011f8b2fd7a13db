"""``medlora cohort lidc --root DIR --out manifest.csv``: a training manifest from a LIDC-IDRI download.

Torch-free: reads DICOM headers and XML only. See ``MedLoRALib.cohort`` for the matching and
labelling rules. Resumable: each patient read is journaled beside the manifest
(``cohort.journal``), so running the same command again after an interruption skips them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cohort.labels import DEFAULT_RULE, LABEL_RULES

EXAMPLE = """example:
  medlora cohort lidc --root ~/TCIA/LIDC-IDRI --out lidc.csv
      reads ~/TCIA/LIDC-IDRI/LIDC-IDRI-0001/<study>/<series>/*.dcm and the XML beside each series;
      writes lidc.csv and lidc.summary.json (run it again to resume after an interruption)
  medlora dataset check lidc.csv
  medlora train --manifest lidc.csv --out lidc-adapter"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLE
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the example's lines
    parser.add_argument("source", choices=["lidc"], help="lidc: a LIDC-IDRI download in TCIA's folder layout")
    parser.add_argument("--root", type=Path, required=True,
                        help="folder holding the patient folders (ROOT/<patient>/<study>/<series>/*.dcm)")
    parser.add_argument("--out", type=Path, required=True,
                        help="manifest CSV to write; the summary goes beside it as <name>.summary.json")
    parser.add_argument("--xml-root", type=Path,
                        help="the unpacked LIDC XML-only archive, for series whose XML is not beside them")
    rules = "; ".join(f"{name}: {text}" for name, text in LABEL_RULES.items())
    parser.add_argument("--label-rule", choices=list(LABEL_RULES), default=DEFAULT_RULE,
                        help=f"how nodules get labels (default {DEFAULT_RULE}). {rules}")
    parser.add_argument("--min-readers", type=int, default=1,
                        help="keep nodules marked by at least this many of the 4 readers (default 1)")
    parser.add_argument("--group-distance-mm", type=float, default=5.0,
                        help="marks of different readers closer than this (or than the larger radius) are one "
                             "nodule (default 5)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a manifest and summary that an earlier 'medlora cohort' wrote")


def _progress(n: int, total: int, name: str) -> None:
    print(f"[{n}/{total}] {name}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from ..cohort import CohortConfig, build_lidc_cohort, format_summary, write_cohort
    from ..cohort.journal import Journal
    from ..cohort.output import check_targets
    from ..errors import DatasetError

    if not 1 <= args.min_readers <= 4:
        raise DatasetError(f"--min-readers must be 1-4 (LIDC has four readers), got {args.min_readers}")
    if not args.group_distance_mm > 0:
        raise DatasetError(f"--group-distance-mm must be positive, got {args.group_distance_mm}")
    check_targets(args.out, args.overwrite)  # before minutes of header reading
    config = CohortConfig(root=args.root, xml_root=args.xml_root, label_rule=args.label_rule,
                          min_readers=args.min_readers, group_distance_mm=args.group_distance_mm)
    with Journal(args.out) as journal:  # resumes an interrupted run; refuses a concurrent one
        cohort = build_lidc_cohort(config, progress=_progress, journal=journal)
        manifest, summary = write_cohort(cohort, args.out, overwrite=args.overwrite)
        journal.remove()
    print(format_summary(cohort.summary))
    print(f"manifest: {manifest} ({len(cohort.rows)} rows)\nsummary: {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``medlora cohort ...`` before the command is registered in ``cli.SUBCOMMANDS`` (same options,
    same exit codes: 0 done, 2 a MedLoRAError)."""
    from ..errors import MedLoRAError

    parser = argparse.ArgumentParser(prog="medlora cohort", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(run(args) or 0)
    except MedLoRAError as exc:
        print(f"medlora cohort: error: {exc}", file=sys.stderr)
        return 2
