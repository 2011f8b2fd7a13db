"""Training progress for people and for programs.

A reporter receives events (``start``, ``step``, ``epoch``, ``checkpoint``, ``done``,
``stopped``, ``error`` — see docs/architecture.md, "Training process") as keyword fields.
``JsonLinesReporter`` writes one JSON object per line for the Slicer module or any other
watcher; ``BarReporter`` draws a tqdm bar for a person at a terminal. Under DDP only rank 0
reports; the others get a ``NullReporter``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Callable, Literal, TextIO

import numpy as np

ProgressKind = Literal["json", "bar", "none", "auto"]


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays become numbers/lists, NaN/inf become null."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


class Reporter:
    """Base reporter: ignores every event."""

    def emit(self, event: str, **fields: Any) -> None:
        """Report one event."""

    def close(self) -> None:
        """Release the terminal (bar) or stream."""


NullReporter = Reporter


class JsonLinesReporter(Reporter):
    """One JSON object per line, flushed at once so a watcher sees it immediately."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **jsonable(fields)}
        self.stream.write(json.dumps(record, allow_nan=False) + "\n")
        self.stream.flush()


class CallbackReporter(Reporter):
    """Hands each event to a function as a dict (for Python callers and tests)."""

    def __init__(self, callback: Callable[[dict], None]) -> None:
        self.callback = callback

    def emit(self, event: str, **fields: Any) -> None:
        self.callback({"event": event, **jsonable(fields)})


class BarReporter(Reporter):
    """A tqdm progress bar over optimizer steps, with epoch summaries printed above it."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bar = None

    def emit(self, event: str, **fields: Any) -> None:
        from tqdm import tqdm

        if event == "start":
            self._close_bar()
            self.bar = tqdm(total=fields.get("total_steps"), initial=fields.get("resumed_step", 0),
                            unit="step", file=self.stream, dynamic_ncols=True,
                            desc=fields.get("stage", "train"))
            self._write(f"training {fields.get('train_size')} nodules, validating {fields.get('val_size')}; "
                        f"{fields.get('trainable_parameters')} trainable parameters")
        elif event == "step" and self.bar is not None:
            self.bar.n = fields.get("global_step", self.bar.n)
            self.bar.set_postfix(loss=f"{fields.get('loss', float('nan')):.4f}",
                                 img_s=f"{fields.get('images_per_s', 0):.1f}", refresh=False)
            self.bar.refresh()
        elif event == "epoch":
            if self.bar is not None:
                self.bar.n = fields.get("global_step", self.bar.n)
                self.bar.refresh()
            auc = fields.get("val_auc")
            self._write(f"epoch {fields.get('epoch')}: train loss {fields.get('train_loss', float('nan')):.4f}, "
                        f"val AUC {'n/a' if auc is None else f'{auc:.3f}'}, "
                        f"ETA {fields.get('eta_s', 0):.0f} s")
        elif event in ("done", "stopped", "error", "checkpoint"):
            detail = fields.get("adapter") or fields.get("checkpoint") or fields.get("message") or ""
            self._write(f"{event}: {detail}")
            if event != "checkpoint":
                self._close_bar()

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()


def make_reporter(kind: ProgressKind = "auto", *, rank: int = 0) -> Reporter:
    """``auto`` draws a bar on an interactive terminal and writes JSON lines otherwise."""
    if rank != 0 or kind == "none":
        return Reporter()
    if kind == "auto":
        kind = "bar" if sys.stdout.isatty() else "json"
    if kind == "json":
        return JsonLinesReporter()
    if kind == "bar":
        return BarReporter()
    raise ValueError(f"unknown progress kind {kind!r}: use json, bar, none or auto")
