"""``medlora experiment``: LoRA (q/v and all), full fine-tuning and a linear probe on the same
patient-level folds, trained by the one trainer (``training.trainer``), compared in one report.

``config`` (arms, presets, the options), ``folder`` (the experiment folder: marker, identity,
what may be replaced), ``jobs`` (one fold × arm through the trainer, its result file),
``runner`` (folds, the jobs of this process, waiting, resuming) and ``report`` (pooled
out-of-fold AUCs, DeLong, plots, the markdown summary; torch-free).
"""

from __future__ import annotations

from .config import ARMS, PRESETS, ExperimentConfig

__all__ = ["ARMS", "PRESETS", "ExperimentConfig"]
