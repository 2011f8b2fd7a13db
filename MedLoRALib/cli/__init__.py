"""The ``medlora`` command line.

Each subcommand lives in its own module of this package with two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when
their subcommand runs, so ``medlora crop`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from .. import __version__
from ..errors import MedLoRAError, disk_problem, explain_os_error

# subcommand -> (module in this package, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "crop": ("crop", "cut nodule patches from a CT into image files and an index CSV"),
    "score": ("score", "score nodules with an adapter and write a results table"),
    "adapters": ("adapters", "list, inspect, import, export, rename, delete or merge adapters"),
    "train": ("train", "train a LoRA adapter from a dataset manifest"),
    "dataset": ("dataset", "check a training manifest before training"),
    "cohort": ("cohort", "build a training manifest from a LIDC-IDRI download (TCIA layout)"),
    "experiment": ("experiment", "LoRA vs full fine-tuning vs linear probe on the same patient folds, one report"),
    "explain": ("explain", "saliency maps of each nodule (attention rollout, gradient × input) as NRRD on the CT grid"),
    "serve": ("serve", "run the scoring engine (JSON lines on stdin/stdout)"),
    "phantom": ("phantom", "write synthetic chest CT phantoms with known nodules"),
    "demo": ("demo", "synthetic end-to-end run: cohort, training, scoring, report"),
    "web": ("web", "score, train and batch-score in the browser (Slicer's views via trame-slicer)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="medlora", description="Lung nodule malignancy with LoRA-adapted Vision Transformers.",
        epilog="Run 'medlora COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"medlora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            _load(module).add_arguments(p)
    return parser


def _load(module: str):
    return importlib.import_module(f"{__name__}.{module}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(_load(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print(f"medlora {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `medlora adapters list | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    except Exception as exc:  # one line when it is the user's to fix, else re-raised (a bug)
        message = _user_message(exc, args)
        if args.verbose or message is None:
            raise
        print(f"medlora {args.command}: error: {message}", file=sys.stderr)
        return 2


# argparse destinations that name where a command writes, and the option the user typed
OUTPUT_OPTIONS = {"out": "--out", "dest": "DEST", "store": "--store"}


def _outputs(args: argparse.Namespace) -> list[tuple[Path, str]]:
    return [(Path(value).expanduser(), option) for dest, option in OUTPUT_OPTIONS.items()
            if isinstance((value := getattr(args, dest, None)), (str, os.PathLike))]


def _user_message(exc: Exception, args: argparse.Namespace) -> str | None:
    """The one line a user sees for ``exc``, or None for a bug (shown as a traceback).

    An OSError (disk full, read-only folder, a file where a folder is needed, ...) is
    explained by its errno. Libraries that lose the errno (SimpleITK and torch raise
    RuntimeError, safetensors its own SafetensorError) are explained by looking at the
    output's disk: full, read-only, or a file-size limit; any other exception is a bug.
    A MedLoRAError keeps its message, with that diagnosis appended when a lower-level
    failure caused it.
    """
    outputs = _outputs(args)
    if isinstance(exc, OSError) and not isinstance(exc, MedLoRAError):  # OutputError already says it all
        path = exc.filename if exc.filename is not None else (outputs[0][0] if outputs else None)
        option = next((opt for out, opt in outputs if path is not None and _within(Path(path), out)), "")
        return str(explain_os_error(exc, path, option, writing=bool(option)))
    if isinstance(exc, MedLoRAError) and (exc.__cause__ is None or isinstance(exc.__cause__, MedLoRAError)):
        return str(exc)
    text = str(exc).lower()  # a file-size limit is named only for an error about writing
    diagnosis = disk_problem([out for out, _ in outputs], size_limit="writ" in text or "too large" in text)
    if isinstance(exc, MedLoRAError):
        return f"{exc} ({diagnosis})" if diagnosis else str(exc)
    return f"{diagnosis} ({type(exc).__name__}: {exc})" if diagnosis else None


def _within(path: Path, folder: Path) -> bool:
    try:
        return path.resolve() == folder.resolve() or folder.resolve() in path.resolve().parents
    except (OSError, RuntimeError):
        return False
