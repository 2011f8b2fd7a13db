"""One stage of training (the holdout run, a fold, or the K-fold refit), epoch by epoch.

The loop owns the optimizer and the progress counters; the ``Trainer`` it is given owns the
model, the data, the processes and the checkpoints. ``progress`` (a plain dict, saved in every
checkpoint) says where the stage stands, so a resumed stage continues at the exact step.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import DatasetError
from ..models import trainable_parameter_count
from . import metrics as M
from .checkpoint import Checkpoint, restore_optimizer
from .evaluation import StageResult, improves
from .schedule import make_optimizer, micro_batches, step_seed

if TYPE_CHECKING:
    from .trainer import Trainer


@dataclass
class Stage:
    """One model trained from scratch: the holdout run, a fold, or the K-fold final refit."""

    name: str
    train: np.ndarray
    val: np.ndarray  # empty for the final refit
    epochs: int


class Stopped(Exception):
    """Raised inside the loop once the stop request has been honoured; ``args[0]`` is the checkpoint."""


def pos_weight(labels: np.ndarray) -> float:
    """n_benign / n_malignant: each class contributes equally to the loss."""
    positives = int(labels.sum())
    return float((len(labels) - positives) / positives) if positives else 1.0


class StageLoop:
    """Train ``stage`` from its start (or from ``resume_from``) to its last epoch or early stop."""

    def __init__(self, trainer: Trainer, stage_index: int, stage: Stage, progress: dict,
                 resume_from: Checkpoint | None) -> None:
        self.t = trainer
        self.cfg = trainer.config
        self.index = stage_index
        self.stage = stage
        self.progress = progress
        self.has_val = len(stage.val) > 0
        self.steps_per_epoch = len(self._micro_batches(0))
        self.total_steps = self.steps_per_epoch * stage.epochs
        self.optimizer, self.scheduler = make_optimizer(trainer.trainable.values(), self.cfg.peak_lr, self.cfg.weight_decay,
                                                        self.total_steps, self.cfg.warmup_fraction)
        self.best_weights = None
        if resume_from is not None:
            trainer.load_weights(resume_from.group("model"))
            restore_optimizer(self.optimizer, resume_from)
            self.scheduler.load_state_dict(resume_from.meta["scheduler"])
            self.best_weights = resume_from.group("best") or None
        else:
            trainer.load_weights(trainer.initial)
            progress.update(epoch=0, step_in_epoch=0, loss_sum=0.0, loss_count=0, best=None)
        self.model: nn.Module = trainer.model
        self.ddp = nn.parallel.DistributedDataParallel(self.model) if trainer.ctx.active else None
        self.pos_weight = pos_weight(trainer.labels[stage.train])
        self.criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(self.pos_weight, device=trainer.ctx.device))
        self.history = progress["history"].setdefault(stage.name, [])
        self.epoch_times: list[float] = []

    def _micro_batches(self, epoch: int) -> list[list[list[int]]]:
        ctx = self.t.ctx
        return micro_batches(self.stage.train, seed=self.cfg.seed, stage_index=self.index, epoch=epoch,
                             rank=ctx.rank, world=ctx.world, batch_size=self.cfg.batch_size,
                             grad_accum=self.cfg.grad_accum)

    def _checkpoint(self) -> Any:
        return self.t.checkpoint(self.progress, self.optimizer, self.scheduler, self.best_weights)

    def run(self) -> dict:
        self._emit_start()
        if self.t.stop_requested():
            raise Stopped(self._checkpoint())
        while self.progress["epoch"] < self.stage.epochs:
            epoch = self.progress["epoch"]
            epoch_start = time.monotonic()
            self._train_epoch(epoch)
            self._end_epoch(epoch, epoch_start)
        return self._result().to_dict()

    def _emit_start(self) -> None:
        t, stage, labels = self.t, self.stage, self.t.labels
        trainable, total = trainable_parameter_count(self.model)
        t.reporter.emit("start", stage=stage.name, stage_index=self.index, stages=self.progress["stages"],
                        train_size=int(len(stage.train)), val_size=int(len(stage.val)),
                        train_malignant=int(labels[stage.train].sum()),
                        val_malignant=int(labels[stage.val].sum()) if self.has_val else 0,
                        patients_train=len({t.data.patient_ids[i] for i in stage.train}),
                        patients_val=len({t.data.patient_ids[i] for i in stage.val}),
                        trainable_parameters=trainable, total_parameters=total,
                        epochs=stage.epochs, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                        resumed_step=self.progress["epoch"] * self.steps_per_epoch + self.progress["step_in_epoch"],
                        processes=t.ctx.world, device=str(t.ctx.device), backbone=t.info.name,
                        random_init=t.info.random_init, mode=self.cfg.mode, pos_weight=self.pos_weight)

    # -- one epoch of optimizer steps --
    def _train_epoch(self, epoch: int) -> None:
        t, progress = self.t, self.progress
        steps = self._micro_batches(epoch)
        first = progress["step_in_epoch"]
        t.train_ds.set_epoch(step_seed(self.index, epoch) % (2 ** 31))
        loader = iter(t.loader([mb for step in steps[first:] for mb in step], t.train_ds))
        window_images, window_start = 0, time.monotonic()
        self.model.train()
        for step_index in range(first, len(steps)):
            torch.manual_seed(step_seed(self.cfg.seed, self.index, epoch, step_index, t.ctx.rank))
            step_size = sum(len(mb) for mb in steps[step_index])
            step_loss = self._step(loader, len(steps[step_index]), step_size)
            if not math.isfinite(step_loss):
                raise DatasetError(f"training loss became {step_loss} at epoch {epoch + 1}, step {step_index + 1}: "
                                   "lower the learning rate (--lr)")
            progress["step_in_epoch"] = step_index + 1
            progress["loss_sum"] += step_loss
            progress["loss_count"] += 1
            window_images += step_size * t.ctx.world
            global_step = epoch * self.steps_per_epoch + step_index + 1
            if global_step % self.cfg.progress_every == 0:
                now = time.monotonic()
                t.reporter.emit("step", stage=self.stage.name, epoch=epoch + 1, epochs=self.stage.epochs,
                                step=step_index + 1, steps_per_epoch=self.steps_per_epoch,
                                global_step=global_step, total_steps=self.total_steps, loss=step_loss,
                                lr=self.scheduler.get_last_lr()[0],
                                images_per_s=window_images / max(now - window_start, 1e-9))
                window_images, window_start = 0, now
            if t.stop_requested():
                raise Stopped(self._checkpoint())

    def _step(self, loader, n_micro: int, step_size: int) -> float:
        """One optimizer step over ``n_micro`` micro-batches; returns its loss."""
        device, forward = self.t.ctx.device, self.ddp or self.model
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro_index in range(n_micro):
            patches, labels, _ = next(loader)
            patches = patches.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            last = micro_index == n_micro - 1
            with (nullcontext() if self.ddp is None or last else self.ddp.no_sync()), self.t.autocast():
                logits = forward(patches)
                loss = self.criterion(logits.float(), labels) * (len(labels) / step_size)
            loss.backward()
            step_loss += float(loss.detach())
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.t.trainable.values()), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return step_loss

    # -- the end of an epoch: validate, keep the best, report, checkpoint --
    def _end_epoch(self, epoch: int, epoch_start: float) -> None:
        t, progress, stage = self.t, self.progress, self.stage
        train_loss = t.ctx.mean(progress["loss_sum"] / max(progress["loss_count"], 1))
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "val_auc": None,
                                  "val_loss": None, "best": False}
        if self.has_val:
            self._validate(epoch, record)
        self.history.append(record)
        progress.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, loss_count=0)
        self.epoch_times.append(time.monotonic() - epoch_start)
        early = self.has_val and progress["best"]["since"] >= self.cfg.patience
        remaining = 0 if early else stage.epochs - epoch - 1
        remaining += sum(self.cfg.epochs for _ in range(self.index + 1, progress["stages"]))
        t.reporter.emit("epoch", stage=stage.name, epoch=epoch + 1, epochs=stage.epochs,
                        global_step=(epoch + 1) * self.steps_per_epoch,
                        train_loss=train_loss, val_auc=record["val_auc"], val_loss=record["val_loss"],
                        best_epoch=(progress["best"] or {}).get("epoch"), elapsed_s=t.elapsed(),
                        eta_s=float(np.mean(self.epoch_times[-3:])) * remaining)
        if early:
            progress["epoch"] = stage.epochs  # patience exhausted: this stage is finished
        path = self._checkpoint()
        t.reporter.emit("checkpoint", stage=stage.name, epoch=epoch + 1, checkpoint=path)
        if t.stop_requested():
            raise Stopped(path)

    def _validate(self, epoch: int, record: dict) -> None:
        val_logits = self.t.predict(self.stage.val)
        val_labels = self.t.labels[self.stage.val]
        record["val_auc"] = M.roc_auc(val_labels, val_logits)
        record["val_loss"] = M.binary_nll(val_labels, val_logits)
        if improves(record, self.progress["best"]):
            self.progress["best"] = {"epoch": epoch + 1, "auc": record["val_auc"], "loss": record["val_loss"],
                                     "since": 0, "val_logits": val_logits.tolist()}
            self.best_weights = self.t.snapshot()
            record["best"] = True
        else:
            self.progress["best"]["since"] += 1

    def _result(self) -> StageResult:
        if not self.has_val:
            return StageResult(self.stage.name, None, None, len(self.history))
        self.t.load_weights(self.best_weights)
        best = self.progress["best"]
        return StageResult(self.stage.name, best["epoch"], best["auc"], len(self.history),
                           self.stage.val.tolist(), best["val_logits"])
