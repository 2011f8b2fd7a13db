"""Training an adapter from labelled points in the scene, in a background process.

Labelled control points (benign/malignant, from the widget or the point description)
on one or many volumes → each volume written once to a work folder → a training
manifest (the project's points-CSV format, LPS) → ``medlora train --progress json``.
Its JSON lines drive the status, a progress fraction and a live plot of loss and
validation AUC (a table node + plot chart node). Cancel asks the trainer to stop (stop
file, then SIGTERM) so it saves a resumable checkpoint, then ends the whole tree.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_path
from ..errors import DatasetError, MedLoRAError
from .mrml import markups_to_points, volume_to_ct_image
from .process import ProcessHandle, ProcessRunner

PLOT_COLUMNS = ("epoch", "train_loss", "val_auc")


@dataclass
class TrainingConfig:
    """What to train.

    Args:
        name: the adapter's name in the store.
        backbone: backbone registry name.
        epochs: passes over the training set.
        rank: LoRA rank.
        python: interpreter with torch/timm/peft (``None``: as for the engine).
        extra_args: further ``medlora train`` options (e.g. ``["--batch-size", "8"]``).
    """

    name: str = "my-adapter"
    backbone: str = "dinov2_vits14"
    epochs: int = 10
    rank: int = 8
    python: str | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: {"HF_HUB_OFFLINE": "1"})


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "volume"


def write_training_set(pairs: list[tuple[object, object]], folder: str | os.PathLike) -> Path:
    """Write the labelled points and their volumes as a training manifest; returns its path.

    Args:
        pairs: (volume node, markups node) for every study to learn from.
        folder: work folder (volumes go to ``images/``, the manifest to ``manifest.csv``).
    """
    from ..ctio import save_volume

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows, unlabelled = [], 0
    for volume, markups in pairs:
        points = markups_to_points(markups, case_id=volume.GetName())
        labelled = [p for p in points if p.training_label is not None]
        unlabelled += len(points) - len(labelled)
        if not labelled:
            continue
        image_path = folder / "images" / f"{_safe_name(volume.GetName())}-{_safe_name(volume.GetID())}.nrrd"
        image = volume_to_ct_image(volume)
        save_volume(image, image_path)
        for point in labelled:
            x, y, z = point.nodule.centre_lps
            rows.append({"x": f"{x:.4f}", "y": f"{y:.4f}", "z": f"{z:.4f}", "coordinate_system": "LPS",
                         "nodule_id": point.name, "label": point.training_label,
                         "patient_id": image.ids.patient_id or volume.GetName(),
                         "image": f"images/{image_path.name}"})
    labels = {row["label"] for row in rows}
    if labels != {0, 1}:
        have = ", ".join(f"{sum(r['label'] == v for r in rows)} {n}" for v, n in ((0, "benign"), (1, "malignant")))
        raise DatasetError(f"training needs benign and malignant points; the scene has {have} labelled "
                           f"({unlabelled} unlabelled). Label points in the MedLoRA module or write "
                           "'benign'/'malignant' in their description.")
    manifest = folder / "manifest.csv"
    with atomic_path(manifest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def train_command(config: TrainingConfig, manifest: Path, out_dir: Path, stop_file: Path,
                  resume: bool = False) -> list[str]:
    """The ``medlora train`` command line for this run."""
    python = config.python
    if python is None:
        from .engine_client import default_python

        python = default_python()
    args = [python or sys.executable, "-m", "MedLoRALib", "train", "--manifest", str(manifest), "--out", str(out_dir),
            "--name", config.name, "--backbone", config.backbone, "--epochs", str(config.epochs),
            "--rank", str(config.rank), "--progress", "json", "--stop-file", str(stop_file)]
    if resume:
        args.append("--resume")
    return args + list(config.extra_args)


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
    """A running ``medlora train``; ``poll`` applies its new events (call it from a timer).

    Args:
        scene: where the plot goes.
        handle: the running process (from the logic's runner).
        config: the run's settings.
        out_dir: the adapter folder the trainer writes (its checkpoint goes beside it).
        store: adapter store to register the finished adapter in (or ``None``).
    """

    def __init__(self, scene, handle: ProcessHandle, config: TrainingConfig, out_dir: Path, store=None) -> None:
        self.scene = scene
        self.handle = handle
        self.config = config
        self.out_dir = Path(out_dir)
        self.store = store
        self.state = TrainingState()
        self.stored_adapter = None
        self.table_node, self.chart_node = self._create_plot()

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

    @property
    def running(self) -> bool:
        return self.state.exit_code is None

    def poll(self) -> list[dict]:
        """Apply the events that arrived since the last call; returns them."""
        events = self._read_events()
        if self.state.exit_code is None and self.handle.poll() is not None:
            self.handle.wait(timeout=5.0)  # let the reader threads deliver the last lines
            events += self._read_events()
            self._finish(self.handle.poll())
        return events

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

    def _finish(self, code: int | None) -> None:
        state = self.state
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
            state.status = f"failed (exit code {code}): {state.error}"

    def cancel(self, grace_s: float = 30.0) -> None:
        """Stop training, keeping its resumable checkpoint; ends the whole process tree."""
        self.handle.cancel(grace_s=grace_s)
        self.poll()
        if self.state.exit_code is None:
            self._finish(self.handle.poll())

    def wait(self, timeout_s: float) -> TrainingState:
        import time

        deadline = time.monotonic() + timeout_s
        while self.running:
            self.poll()
            if time.monotonic() > deadline:
                raise MedLoRAError(f"training did not finish within {timeout_s:.0f} s")
            time.sleep(0.1)
        return self.state


def start_training(scene, runner: ProcessRunner, pairs: list[tuple[object, object]], work_dir: str | os.PathLike,
                   config: TrainingConfig | None = None, store=None, resume: bool = False) -> TrainingJob:
    """Write the training set from the scene and launch ``medlora train`` in the background."""
    config = config or TrainingConfig()
    work_dir = Path(work_dir)
    manifest = work_dir / "manifest.csv" if resume else write_training_set(pairs, work_dir)
    if not manifest.exists():
        raise MedLoRAError(f"nothing to resume in {work_dir}: no manifest.csv there.")
    out_dir = work_dir / "adapter"
    stop_file = work_dir / "STOP"
    stop_file.unlink(missing_ok=True)
    handle = runner.start(train_command(config, manifest, out_dir, stop_file, resume), cwd=str(work_dir),
                          env=config.env, stop_file=str(stop_file))
    return TrainingJob(scene, handle, config, out_dir, store=store)
