"""One fold × arm: trained by the project's trainer on the experiment's fold, recorded in ``result.json``.

``FoldTrainer`` is ``training.trainer.Trainer`` with one stage, the given fold (train on the other
folds' patients, validate on this one's) instead of a holdout split it would draw itself; the loop,
the checkpoints, early stopping and the adapter folder are the trainer's own. A job stopped part way
leaves the trainer's checkpoint and resumes from it; a checkpoint that cannot be used (other
settings, damaged) is discarded and the job restarts from its beginning. ``result.json`` is written
last, atomically: a job with it is finished and skipped on a rerun. The fold's model is written
as an adapter (``adapter/``, with the trainer's plots) only with ``--keep-adapters``.

Each job runs as a single process (no ``torch.distributed``): under ``torchrun`` the processes share
out whole jobs (``runner``), they do not split one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from ..atomic import write_json_atomic
from ..errors import MedLoRAError
from ..training.progress import Reporter, jsonable
from ..training.splits import Split
from .config import ARMS, ExperimentConfig

RESULT_NAME = "result.json"
EVENTS_NAME = "events.jsonl"
ADAPTER_NAME = "adapter"


@dataclass(frozen=True)
class Job:
    fold: int  # 1-based
    arm: str

    @property
    def name(self) -> str:
        return f"fold{self.fold}-{self.arm}"


def all_jobs(folds: int, arms: tuple[str, ...]) -> list[Job]:
    """Fold-major order, so the first jobs finished already compare every arm on one fold."""
    return [Job(k, arm) for k in range(1, folds + 1) for arm in arms]


def read_result(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RESULT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class JobProgress(Reporter):
    """The trainer's events: every one to ``events.jsonl``, a line per epoch and at the end to ``stream``."""

    def __init__(self, log: Path, prefix: str, stream: TextIO | None = None) -> None:
        self.log = open(log, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.loop_started: float | None = None
        self.loop_s = 0.0  # optimizer steps and validation of this process's part of the job

    def emit(self, event: str, **fields) -> None:
        self.log.write(json.dumps({"event": event, "time": round(time.time(), 3), **jsonable(fields)}) + "\n")
        self.log.flush()
        text = None
        if event == "start":
            self.loop_started = time.monotonic()
            text = (f"training on {fields.get('train_size')} nodules ({fields.get('patients_train')} patients), "
                    f"validating on {fields.get('val_size')} ({fields.get('patients_val')} patients); "
                    f"{fields.get('trainable_parameters')} trainable parameters"
                    + (f"; resuming at step {fields['resumed_step']}" if fields.get("resumed_step") else ""))
        elif event == "epoch":
            if self.loop_started is not None:
                self.loop_s = time.monotonic() - self.loop_started
            auc = fields.get("val_auc")
            text = (f"epoch {fields.get('epoch')}/{fields.get('epochs')}: train loss {fields.get('train_loss'):.4f}, "
                    f"val AUC {'n/a' if auc is None else f'{auc:.3f}'}, {fields.get('elapsed_s', 0):.0f} s")
        elif event in ("stopped", "error"):
            text = f"{event}: {fields.get('message') or fields.get('checkpoint') or ''}"
        if text:
            print(f"{self.prefix} {text}", file=self.stream, flush=True)

    def close(self) -> None:
        self.log.close()


def _trainer_class():
    from ..training.loop import Stage
    from ..training.trainer import Trainer, TrainResult

    class FoldTrainer(Trainer):
        """The trainer on one given fold: a single stage, no holdout drawn, no refit.

        The stage's result (best epoch, validation indices and logits) is kept as ``stage_result``.
        Unless ``keep_adapter``, the fold's model is not written as an adapter (the experiment
        needs its predictions, not twenty adapters with their plots): the trainer's checkpoint is
        removed as after any finished run.
        """

        def __init__(self, *args, split: Split, keep_adapter: bool = False, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.split = split
            self.keep_adapter = keep_adapter
            self.stage_result: dict | None = None

        def _stages(self, progress: dict) -> list[Stage]:
            return [Stage(self.split.name, self.split.train, self.split.val, self.config.epochs)]

        def _finish(self, progress: dict) -> TrainResult:
            self.stage_result = progress["folds"][0]
            if self.keep_adapter:
                return super()._finish(progress)
            shutil.rmtree(self.config.checkpoint_folder, ignore_errors=True)
            self.reporter.emit("done", elapsed_s=self.elapsed())
            return TrainResult(status="done", history=progress["history"], folds=progress["folds"])

    return FoldTrainer


def _device(preferred: str | None):
    """This process's device; under torchrun on GPUs, the one of its LOCAL_RANK."""
    import torch

    from ..device import choose_device

    device = choose_device(preferred)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def warm_up(config: ExperimentConfig) -> None:
    """Import the model libraries and read the backbone once, untimed, so the first job's wall time
    (whichever arm it is) does not carry the process's start-up."""
    import torch

    from ..models import build_model

    with torch.random.fork_rng():
        build_model(config.backbone, patch_spec=config.patch_spec(), mode="linear", weights=config.weights,
                    allow_random_init=config.random_init)


class JobStopped(MedLoRAError):
    """The job was stopped on request (SIGINT, SIGTERM); its checkpoint resumes it."""


def run_job(config: ExperimentConfig, job: Job, split: Split, data, folder: Path, prefix: str) -> dict:
    """Train ``job`` into ``folder`` (the caller holds its lock) and write its ``result.json``.

    ``wall_s`` is the trainer's elapsed time (set-up, epochs, evaluation, and the adapter with
    ``keep_adapters``; summed over resumptions); ``train_loop_s`` the epochs alone (of the last
    resumption only).
    """
    import torch

    from ..models import trainable_parameter_count
    from ..training.checkpoint import CheckpointError, has_checkpoint
    from ..training.processes import DistContext, StopSignal
    from .memory import PeakMemory
    from .report import fold_metrics

    folder.mkdir(parents=True, exist_ok=True)
    cfg = config.train_config(job.arm, folder / ADAPTER_NAME)
    cfg.resume = resumed = has_checkpoint(cfg.checkpoint_folder)
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx = DistContext(device=_device(config.device))
    reporter = JobProgress(folder / EVENTS_NAME, prefix)
    stop = StopSignal()
    stop.install()
    try:
        def trainer_for(settings):
            return _trainer_class()(settings, reporter, ctx, stop, data, split=split,
                                    keep_adapter=config.keep_adapters)

        with PeakMemory(ctx.device) as peak:
            trainer = trainer_for(cfg)
            try:
                result = trainer.run()
            except CheckpointError as exc:
                print(f"{prefix} its checkpoint cannot be used ({exc}); starting the job again", file=sys.stderr)
                cfg.resume = resumed = False
                trainer = trainer_for(cfg)
                result = trainer.run()
    finally:
        stop.uninstall()
        reporter.close()
    if result.status == "stopped":
        raise JobStopped(f"{job.name} stopped; its checkpoint is in {cfg.checkpoint_folder}: rerun with --resume")
    trainable, total = trainable_parameter_count(trainer.model)
    validation = _validation(trainer.stage_result, split, data)
    record = {
        "job": job.name, "fold": job.fold, "arm": job.arm, "mode": ARMS[job.arm][0], "lora_targets": ARMS[job.arm][1],
        "metrics": fold_metrics(validation, n_boot=config.n_boot, seed=config.seed), "validation": validation,
        "best_epoch": trainer.stage_result["best_epoch"], "epochs_run": trainer.stage_result["epochs_run"],
        "trainable_parameters": trainable, "total_parameters": total, "wall_s": round(trainer.elapsed(), 3),
        "train_loop_s": round(reporter.loop_s, 3), "resumed": resumed,
        "memory": peak.record, "device": str(ctx.device),
        "adapter": ADAPTER_NAME if config.keep_adapters else None,
        "process": {"rank": int(os.environ.get("RANK", "0")), "pid": os.getpid()},
    }
    write_json_atomic(folder / RESULT_NAME, jsonable(record))
    return record


def _validation(stage: dict, split: Split, data) -> list[dict]:
    """The fold's validation nodules with the best epoch's logits, checked to be exactly the fold's
    (a pairing across arms, as DeLong's test makes, must never pair different nodules)."""
    if list(stage["val_indices"]) != split.val.tolist():
        raise RuntimeError(f"the trainer validated {stage['name']} on other nodules than the fold's")
    out = []
    for index, logit in zip(stage["val_indices"], stage["val_logits"]):
        s = data.samples[index]
        out.append({"index": int(index), "nodule_id": s.nodule_id, "patient_id": s.patient_id, "row": s.row,
                    "label": int(s.label), "logit": float(np.float64(logit))})
    return out
