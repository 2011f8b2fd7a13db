"""``medlora train``: train a LoRA adapter from a dataset manifest.

The options and their defaults come from ``training.config.TrainConfig`` (one place); this
module only adds how progress is shown. Exit codes (docs/architecture.md, "Training process"):
0 done, 2 bad input (also: the output is being trained by another process), 3 stopped on
request with a resumable checkpoint (rerun with ``--resume``), 1 unexpected failure.
"""

from __future__ import annotations

import argparse

EXIT_STOPPED = 3
GROUPS = {"data": "data and output", "model": "model", "optimisation": "optimisation", "process": "process"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.config import options

    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for opt in options():
        target = groups[opt.group]
        if opt.exclusive:
            if opt.exclusive not in exclusive:
                exclusive[opt.exclusive] = target.add_mutually_exclusive_group()
            target = exclusive[opt.exclusive]
        kwargs: dict = {"dest": opt.dest, "help": opt.help}
        if opt.is_switch:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=opt.type, default=opt.default, choices=opt.choices,
                          metavar=None if opt.choices else opt.flag.lstrip("-").upper().replace("-", "_"))
            if opt.required:
                kwargs["required"] = True
        target.add_argument(opt.flag, *opt.aliases, **kwargs)
    groups["optimisation"].add_argument("--no-augment", action="store_true", help="train on unaugmented patches")
    groups["process"].add_argument("--progress", choices=["json", "bar", "none", "auto"], default="auto",
                                   help="json: one JSON event per line on stdout; bar: tqdm; auto: bar on a terminal")


def build_config(args: argparse.Namespace):
    from ..training.config import TrainConfig

    return TrainConfig.from_cli(args)


def run(args: argparse.Namespace) -> int:
    import os

    from ..errors import MedLoRAError
    from ..training.progress import BarReporter, make_reporter
    from ..training.trainer import train

    reporter = make_reporter(args.progress, rank=int(os.environ.get("RANK", "0")))
    try:
        if isinstance(reporter, BarReporter):
            args.progress_every = 1  # a bar moves every step; JSON watchers get every N-th
        config = build_config(args)
    except MedLoRAError as exc:
        reporter.emit("error", message=str(exc), type=type(exc).__name__)
        reporter.close()
        raise
    try:
        result = train(config, reporter)
    finally:
        reporter.close()
    return EXIT_STOPPED if result.status == "stopped" else 0
