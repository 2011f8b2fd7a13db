"""The Train tab's pieces: the options a run starts with, and its live loss/AUC curve as SVG.

Options are ``training.config.TrainConfig`` — the dataclass ``medlora train`` is built from —
so the page's defaults are the command line's. The ``tiny`` preset is the module's self-test
configuration (``slicer.selftest.tiny_training``): a random-init tiny backbone, seconds on a CPU.
"""

from __future__ import annotations

import dataclasses

from ..errors import MedLoRAError
from ..slicer.selftest import tiny_training
from ..training.config import TrainConfig

PRESETS = ("default", "tiny")


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
