"""Writing the trained adapter with its reports, in one atomic folder swap.

Everything goes to a hidden staging folder beside ``out`` (the weights, ``manifest.json``,
``metrics.json``, three plots and the ``.medlora-output`` marker) and is renamed into place
last: a run killed, or a disk that fills, before the rename leaves the previous adapter as it
was and no half-written one. The staging folder has ``atomic.staging_name``'s name
(``.<out>.tmp-<pid>-<token>``), so what a killed run left is swept (``atomic.sweep_leftovers``)
before the next adapter is written there. Resume never needs it: it continues from the
checkpoint folder (``TrainConfig.checkpoint_folder``), which is not a staging name.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..adapters.overwrite import TRAINING_REPORTS
from ..atomic import replace_dir, staging_name, sweep_leftovers, write_json_atomic
from ..errors import OutputError, os_error_reason
from ..outputs import ADAPTER, write_marker
from .evaluation import Evaluation
from .progress import jsonable


@dataclass
class AdapterReport:
    """What a finished run records beside the weights."""

    evaluation: Evaluation
    training: dict  # the run's summary (manifest, counts, split, epochs, settings)
    history: dict  # per stage, per epoch: train_loss, val_auc, val_loss, best


def write_adapter(model, manifest, out: Path, report: AdapterReport) -> Path:
    """Save ``model`` with its ``AdapterManifest`` and ``report`` as the adapter folder ``out``."""
    from ..adapters.package import save_adapter
    from .reports import plot_calibration, plot_roc, plot_training_curves

    evaluation = report.evaluation
    metrics, roc, calibration, curves = TRAINING_REPORTS
    staging = staging_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(out.parent)  # what killed runs left (their processes are gone), never other files
        save_adapter(model, manifest, staging)
        write_json_atomic(staging / metrics, jsonable({"metrics": evaluation.metrics, "history": report.history,
                                                       "training": report.training,
                                                       "validation_predictions": evaluation.predictions}))
        plot_roc(staging / roc, evaluation.labels, evaluation.logits, evaluation.overall)
        plot_calibration(staging / calibration, evaluation.labels, evaluation.logits,
                         evaluation.overall.temperature)
        plot_training_curves(staging / curves, report.history)
        write_marker(staging, ADAPTER)
        replace_dir(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"could not write the adapter to {out}: {os_error_reason(exc)}. "
                          + ("The previous adapter there is unchanged. " if out.exists() else "")
                          + "Free space or choose a writable --out, then rerun with --resume "
                          "(the checkpoint is kept).") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def adapter_manifest(cfg, info, spec, evaluation: Evaluation, training: dict):
    """The ``AdapterManifest`` of a run: backbone identity, crop, LoRA settings and calibration."""
    from ..adapters import AdapterManifest

    overall = evaluation.overall
    return AdapterManifest(
        name=cfg.name or cfg.out.name, backbone=info.name, backbone_sha256=info.identity,
        random_init=info.random_init, random_init_fingerprint=info.random_init_fingerprint,
        patch_spec=spec.to_dict(), lora=cfg.lora.to_dict() if cfg.mode == "lora" else None, mode=cfg.mode,
        threshold=float(overall.threshold), temperature=float(overall.temperature), training=training,
        metrics=jsonable(evaluation.metrics), tta=cfg.tta)
