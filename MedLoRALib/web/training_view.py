"""The Train tab: its actions (``TrainTab``), the options a run starts with, its live loss/AUC curve as SVG.

Runs go through the module's ``ModuleLogic.startTraining`` on the labelled points of every open
study. Options are ``training.config.TrainConfig`` — the dataclass ``medlora train`` is built
from — so the page's defaults are the command line's. The ``tiny`` preset is the module's
self-test configuration (``slicer.selftest.tiny_training``): a random-init tiny backbone,
seconds on a CPU.
"""

from __future__ import annotations

import dataclasses

from ..errors import MedLoRAError
from ..slicer.selftest import tiny_training
from ..slicer.training import TrainingConfig, TrainingJob
from ..training.config import TrainConfig
from .guard import guarded

PRESETS = ("default", "tiny")
#: after Cancel, how long the trainer may take to save its stop checkpoint before its process tree
#: is ended (the module's default is 30 s; a browser user expects Cancel to be quick, and the
#: checkpoint of the last finished epoch stays for Resume either way)
CANCEL_GRACE_S = 5.0


class TrainTab:
    """The Train tab's actions, and what it shows of a run (also while a cancelled one winds down)."""

    def __init__(self, state, logic) -> None:
        self.state, self.logic = state, logic  # the page's state, the module's ``ModuleLogic``
        self.job: TrainingJob | None = None  # the run shown

    def init_state(self) -> None:
        s = self.state
        s.train_name, s.train_preset, s.train_epochs = "my-adapter", "default", TrainConfig().epochs
        s.train_progress, s.train_status, s.train_curve, s.training = 0, "", "", False

    @guarded
    def start(self, resume: bool, preset: str, name: str, epochs) -> None:
        """Train on the labelled points of every open study (the module's ``startTraining``)."""
        s = self.state
        self.logic.startTraining(TrainingConfig(train=train_config(preset, name, epochs)), resume=bool(resume))
        s.training, s.busy, s.error = True, True, ""
        s.train_progress, s.train_curve, s.train_status = 0, "", "starting"

    @guarded
    def cancel(self) -> None:
        if isinstance(self.logic.job, TrainingJob):
            self.logic.job.cancel_grace_s = CANCEL_GRACE_S
            self.logic.cancelJob()
            self.state.train_status = "stopping: saving a resumable checkpoint…"
        self.state.training = False

    def follow(self, running) -> None:
        """Each tick, with the logic's job: show the run in progress, or a cancelled one until it has ended."""
        if isinstance(running, TrainingJob):
            self.job = running
        if self.job is not None:
            self.show(self.job)
            if self.job.finished:
                self.job = None

    def finished(self, job: TrainingJob) -> None:
        self.show(job)
        self.state.training = False

    def failed(self, status: str) -> None:
        self.state.train_status, self.state.training = status, False
        self.job = None

    def show(self, job: TrainingJob) -> None:
        s = self.state
        s.train_progress = int(round(100 * job.progress))
        s.train_status = job.status
        if len(job.state.epochs) != s.train_curve.count("<!--e-->"):
            s.train_curve = curve_svg(job.state.epochs) + "<!--e-->" * len(job.state.epochs)


def train_config(preset: str, name: str, epochs) -> TrainConfig:
    """``medlora train``'s defaults (or the tiny preset) with the page's name and epoch count."""
    name = (name or "").strip()
    if not name:
        raise MedLoRAError("give the adapter a name before training.")
    try:
        epochs = int(epochs)
    except (TypeError, ValueError):
        epochs = 0
    if epochs < 1:
        raise MedLoRAError(f"epochs: give a whole number of at least 1, not {epochs!r}.")
    if preset not in PRESETS:
        raise MedLoRAError(f"training preset '{preset}': choose one of {', '.join(PRESETS)}.")
    base = tiny_training(name=name, epochs=epochs) if preset == "tiny" else TrainConfig()
    return dataclasses.replace(base, name=name, epochs=epochs)


def curve_svg(epochs: list[dict], width: int = 380, height: int = 120) -> str:
    """Training loss (blue, scaled to its maximum) and validation AUC (orange, 0 to 1) per epoch."""
    if not epochs:
        return ""
    losses = [float(e.get("train_loss") or 0.0) for e in epochs]
    aucs = [e.get("val_auc") for e in epochs]
    top = max(max(losses), 1e-9)
    step = (width - 20) / max(1, len(epochs) - 1)

    def line(values, scale, colour, css_id):
        points = " ".join(f"{10 + i * step:.1f},{height - 10 - (height - 20) * v / scale:.1f}"
                          for i, v in enumerate(values) if v is not None)
        return f'<polyline id="{css_id}" fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>'

    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'style="background:#fafafa;border:1px solid #ddd">'
            + line(losses, top, "#1f77b4", "loss-curve") + line(aucs, 1.0, "#ff7f0e", "auc-curve")
            + f'<text x="12" y="14" font-size="11" fill="#1f77b4">loss (max {top:.3g})</text>'
            + '<text x="120" y="14" font-size="11" fill="#ff7f0e">validation AUC (0–1)</text></svg>')
