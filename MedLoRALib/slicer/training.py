"""A training job: an adapter trained from labelled points in the scene, in a background process.

Labelled control points (benign/malignant, from the widget or the point description)
on one or many volumes → the volumes written to a work folder a few slices per ``poll``
(``training_set.py``; the GUI never waits for the disk) → a training manifest (the
project's points-CSV format, LPS) → ``medlora train --progress json``. Its JSON lines
drive the status, a progress fraction and a live plot of loss and validation AUC (a table
node + plot chart node). Cancel asks the trainer to stop (stop file, then SIGTERM) so it
saves a resumable checkpoint; ``poll`` ends the whole tree after the grace period. The
job follows ``jobs.Job``.

Training options are ``training.config.TrainConfig``, the one dataclass ``medlora train``'s
command line is built from; ``TrainingConfig`` adds only the process to run it in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MedLoRAError
from ..training.config import TrainConfig
from .process import ProcessHandle, ProcessRunner, describe_exit
from .training_set import TrainingSetWriter, write_training_set

__all__ = ["TrainingConfig", "TrainingJob", "TrainingState", "start_training", "train_command",
           "write_training_set"]

PLOT_COLUMNS = ("epoch", "train_loss", "val_auc")
DRAIN_WAIT_S = 2.0  # after the exit, how long to wait for its last lines (grandchildren may hold the pipe)


@dataclass
class TrainingConfig:
    """What to train, and the interpreter to train it with.

    Args:
        train: every ``medlora train`` option with its default (``TrainConfig``, the same
            dataclass the command line is built from); the job fills in its manifest, output
            folder, stop file and ``--resume``.
        python: interpreter with torch/timm/peft (``None``: as for the engine).
        env: environment of the training process.
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(name="my-adapter", epochs=10))
    python: str | None = None
    env: dict[str, str] = field(default_factory=lambda: {"HF_HUB_OFFLINE": "1"})

    @property
    def name(self) -> str:
        return self.train.name or "my-adapter"

    @property
    def epochs(self) -> int:
        return self.train.epochs


def train_command(config: TrainingConfig, manifest: Path, out_dir: Path, stop_file: Path,
                  resume: bool = False) -> list[str]:
    """The ``medlora train`` command line for this run (only the options that differ from their defaults)."""
    python = config.python
    if python is None:
        from .engine_client import default_python

        python = default_python()
    run = dataclasses.replace(config.train, name=config.name, manifest=manifest, out=out_dir, stop_file=stop_file,
                              resume=resume)
    return [python or sys.executable, "-m", "MedLoRALib", "train", *run.cli_args(), "--progress", "json"]


@dataclass
class TrainingState:
    """What the GUI shows: status text, progress fraction, the last events."""

    status: str = "starting"
    fraction: float = 0.0
    epochs: list[dict] = field(default_factory=list)
    checkpoint: str | None = None
    adapter_path: str | None = None
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    exit_code: int | None = None


class TrainingJob:
    """A training run: first the training set is written, then ``medlora train`` runs; ``poll`` advances both.

    Args:
        scene: where the plot goes.
        runner: starts the trainer process.
        config: the run's settings.
        work_dir: the run's folder (training set, adapter, checkpoint, stop file).
        writer: the planned training set (``None`` to resume from the one already written).
        store: adapter store to register the finished adapter in (or ``None``).
        resume: continue from the checkpoint in ``work_dir``.
    """

    def __init__(self, scene, runner: ProcessRunner, config: TrainingConfig, work_dir: str | os.PathLike,
                 writer: TrainingSetWriter | None = None, store=None, resume: bool = False,
                 cancel_grace_s: float = 30.0) -> None:
        self.scene = scene
        self.runner = runner
        self.config = config
        self.work_dir = Path(work_dir)
        self.out_dir = self.work_dir / "adapter"
        self.stop_file = self.work_dir / "STOP"
        self.writer = writer
        self.store = store
        self.resume = resume
        self.cancel_grace_s = cancel_grace_s
        self.handle: ProcessHandle | None = None
        self.cancelled = False
        self._exited_at: float | None = None
        self.state = TrainingState(status="writing the training set" if writer is not None else "starting")
        self.stored_adapter = None
        self.table_node, self.chart_node = self._create_plot()

    # --- the job interface (jobs.Job) ------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.state.exit_code is not None

    @property
    def running(self) -> bool:
        return not self.finished

    @property
    def progress(self) -> float:
        if self.writer is not None and not self.writer.done:
            return 0.05 * self.writer.written_bytes / max(1, self.writer.total_bytes)
        return 0.05 + 0.95 * self.state.fraction

    @property
    def status(self) -> str:
        return self.state.status

    @property
    def results_table(self):
        return None

    def poll(self) -> bool:
        """Write a few more slices, or start the trainer, or apply its new events; True once finished."""
        if self.finished:
            return True
        if self.handle is None:
            if self.cancelled:
                self._finish(None, "cancelled before training started")
                return True
            if self.writer is not None and not self.writer.step():
                self.state.status = (f"writing the training set ({self.writer.written_bytes // 2**20} of "
                                     f"{self.writer.total_bytes // 2**20} MB)")
                return False
            self._launch()
            return False
        self._read_events()
        code = self.handle.poll()
        if code is not None:
            self._exited_at = self._exited_at or time.monotonic()
            if self.handle.drained() or time.monotonic() - self._exited_at > DRAIN_WAIT_S:
                self._read_events()
                self._finish(code)
        return self.finished

    def _launch(self) -> None:
        manifest = self.work_dir / "manifest.csv"
        if not manifest.exists():
            raise MedLoRAError(f"nothing to resume in {self.work_dir}: no manifest.csv there.")
        self.stop_file.unlink(missing_ok=True)
        self.handle = self.runner.start(train_command(self.config, manifest, self.out_dir, self.stop_file,
                                                      self.resume),
                                        cwd=str(self.work_dir), env=self.config.env, stop_file=str(self.stop_file))
        self.state.status = "starting"

    def cancel(self) -> None:
        """Ask the trainer to stop and keep its resumable checkpoint; never waits (keep polling)."""
        self.cancelled = True
        if self.handle is None:
            if self.writer is not None:
                self.writer.abort()
        else:
            self.handle.stop(grace_s=self.cancel_grace_s)
            self.state.status = "stopping: saving a resumable checkpoint…"

    def _create_plot(self):
        import vtk

        table_node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{self.config.name} training")
        for name in PLOT_COLUMNS:
            column = vtk.vtkDoubleArray()
            column.SetName(name)
            table_node.AddColumn(column)
        chart = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{self.config.name} training")
        chart.SetTitle(f"Training {self.config.name}")
        chart.SetXAxisTitle("epoch")
        for column, colour in (("train_loss", (0.1, 0.4, 0.9)), ("val_auc", (0.9, 0.3, 0.1))):
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.config.name} {column}")
            series.SetAndObserveTableNodeID(table_node.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetColor(*colour)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        return table_node, chart

    def _add_epoch(self, event: dict) -> None:
        table = self.table_node.GetTable()
        row = table.InsertNextBlankRow()
        for index, name in enumerate(PLOT_COLUMNS):
            value = event.get(name)
            table.SetValue(row, index, float("nan") if value is None else float(value))
        table.Modified()
        self.table_node.Modified()

    def _read_events(self) -> list[dict]:
        events = []
        for line in self.handle.read_lines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # not a progress line
            if isinstance(event, dict) and "event" in event:
                self._apply(event)
                events.append(event)
        return events

    def _apply(self, event: dict) -> None:
        kind = event["event"]
        state = self.state
        if kind == "start":
            state.status = (f"training on {event.get('train_size', '?')} nodules, "
                            f"validating on {event.get('val_size', '?')}")
        elif kind == "step":
            epochs = max(1, int(event.get("epochs") or self.config.epochs))
            steps = max(1, int(event.get("steps_per_epoch") or 1))
            done = (int(event.get("epoch", 1)) - 1) + int(event.get("step", 0)) / steps
            state.fraction = min(0.99, max(state.fraction, done / epochs))
            if event.get("loss") is not None:
                state.status = f"epoch {event.get('epoch', '?')}: loss {float(event['loss']):.4f}"
        elif kind == "epoch":
            state.epochs.append(event)
            self._add_epoch(event)
            state.fraction = min(0.99, len(state.epochs) / max(1, self.config.epochs))
            auc = event.get("val_auc")
            loss = event.get("train_loss", float("nan"))
            state.status = (f"epoch {event.get('epoch')}/{self.config.epochs}: loss {loss:.4f}"
                            + (f", validation AUC {auc:.3f}" if auc is not None else "")
                            + (f", about {event['eta_s']:.0f} s left" if event.get("eta_s") is not None else ""))
        elif kind == "checkpoint":
            state.checkpoint = event.get("checkpoint") or event.get("path")
        elif kind == "done":
            state.adapter_path = event.get("adapter") or event.get("path") or str(self.out_dir)
            state.metrics = event.get("metrics") or {}
        elif kind == "stopped":
            state.checkpoint = event.get("checkpoint") or event.get("path") or state.checkpoint
        elif kind == "error":
            state.error = event.get("message", "training failed")

    def _finish(self, code: int | None, reason: str = "") -> None:
        state = self.state
        if code is None:  # never started
            state.exit_code, state.status = -1, reason
            return
        state.exit_code = code
        if code == 0 and state.adapter_path:
            state.fraction = 1.0
            state.status = f"done: adapter {self.config.name}"
            if self.store is not None:
                self.stored_adapter = self.store.import_(state.adapter_path)
        elif code == 3:
            state.status = f"stopped; resumable checkpoint in {state.checkpoint or self.out_dir}"
        else:
            if not state.error:
                tail = self.handle.stderr_tail().strip().splitlines()
                state.error = tail[-1] if tail else "no message"
            state.status = f"failed ({describe_exit(code)}): {state.error}"

    def wait(self, timeout_s: float) -> TrainingState:
        """Poll until the run has ended (scripts, tests)."""
        from .jobs import run_to_end

        run_to_end(self, timeout_s, poll_s=0.1)
        return self.state


def plot_view_node(scene, chart_node, view_node=None):
    """A plot view node showing ``chart_node``, for ``qMRMLPlotWidget.setMRMLPlotViewNode``.

    ``qMRMLPlotWidget`` shows a ``vtkMRMLPlotViewNode`` (``setMRMLPlotViewNode``,
    ``Libs/MRML/Widgets/qMRMLPlotWidget.h`` v5.4.0), which points at the chart
    (``vtkMRMLPlotViewNode::SetPlotChartNodeID``). One view node is reused across runs.
    """
    if view_node is None or view_node.GetScene() is not scene:
        view_node = scene.AddNewNodeByClass("vtkMRMLPlotViewNode", "MedLoRA training plot")
        view_node.SetLayoutLabel("MedLoRA")
    view_node.SetPlotChartNodeID(chart_node.GetID() if chart_node is not None else None)
    return view_node


def start_training(scene, runner: ProcessRunner, pairs: list[tuple[object, object]], work_dir: str | os.PathLike,
                   config: TrainingConfig | None = None, store=None, resume: bool = False) -> TrainingJob:
    """Plan the training set from the scene and return the job (which writes it, then trains); never waits.

    Labels are checked here, so a set without both classes fails at once with a clear message.
    """
    config = config or TrainingConfig()
    writer = None if resume else TrainingSetWriter.plan(pairs, work_dir)
    if resume and not (Path(work_dir) / "manifest.csv").exists():
        raise MedLoRAError(f"nothing to resume in {work_dir}: no manifest.csv there.")
    return TrainingJob(scene, runner, config, work_dir, writer=writer, store=store, resume=resume)
