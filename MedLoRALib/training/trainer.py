"""The training loop: patient-level splits, AdamW with warm-up + cosine, early stopping on
validation AUC, exact stop/resume, DDP, and an atomically written adapter with reports.

Python API::

    from MedLoRALib.training.trainer import TrainConfig, train
    result = train(TrainConfig(manifest="cohort.csv", out="my_adapter", backbone="medlora_tiny",
                               random_init=True, epochs=8), reporter)

Reproducibility: every random draw is derived from (seed, stage, epoch, step) — the
batch order, each sample's augmentation and the dropout of each optimizer step — so a run
stopped after any step and resumed reaches bit-identical weights on CPU.

K-fold mode (``folds=K``): each fold trains with early stopping; the out-of-fold logits of
every fold's best epoch give the reported metrics, the temperature and the threshold; the
adapter itself is then retrained on all data for the mean best epoch count (every nodule
contributes to the shipped weights, and its calibration comes from data it never saw).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..atomic import replace_dir, write_json_atomic
from ..errors import DatasetError, MedLoRAError
from ..models import LoraSpec, build_model, trainable_parameter_count
from ..patches import PatchSpec
from . import metrics as M
from .augment import AugmentConfig, patch_reach_mm
from .checkpoint import (
    CheckpointError,
    has_checkpoint,
    load_checkpoint,
    restore_optimizer,
    save_checkpoint,
    set_rng_state,
)
from .dataset import PatchDataset, ignore_sigint_in_worker
from .manifest import TrainingSet, check_training_set
from .progress import Reporter, jsonable
from .splits import Split, holdout_split, kfold_splits

log = logging.getLogger(__name__)

DEFAULT_LR = {"lora": 1e-3, "full": 1e-4, "linear": 1e-3}
DEFAULT_PIXELS = 112  # 8 DINOv2 patches of 14 px; backbones trained at less use their own size


@dataclass
class TrainConfig:
    """Everything that decides a training run (the first group must match to resume).

    Args:
        manifest: dataset manifest (CSV or JSON; see ``manifest``).
        out: adapter directory to write.
        backbone: registry name or timm ViT name.
        weights: local backbone weights file; ``None`` looks in assets / the hub cache.
        random_init: allow a (seeded) random backbone — tests and demos only.
        mode: ``lora`` (LoRA + final norm + head), ``full`` or ``linear`` (head only).
        lora: LoRA hyper-parameters (rank, alpha, dropout, targets, last_n_blocks, ...).
        patch_spec: the crop; ``None`` = 9 planes, 50 mm, the backbone's size up to 112 px.
        epochs: most epochs per stage (early stopping may end sooner).
        batch_size: samples per micro-batch on each process.
        grad_accum: micro-batches per optimizer step (effective batch = batch_size × grad_accum × processes).
        lr: peak learning rate; ``None`` = 1e-3 for lora/linear, 1e-4 for full.
        weight_decay: AdamW decay on matrices (never on biases and norms).
        warmup_fraction: share of optimizer steps with linear warm-up before cosine decay.
        max_grad_norm: gradient clipping (0 disables).
        patience: epochs without a better validation AUC before stopping early.
        folds: K for patient-level K-fold cross-validation, else a holdout of ``val_fraction``.
        seed: the only source of randomness.
        augment: training augmentation.
        name: adapter name; default the ``out`` folder's name.
        num_workers: DataLoader worker processes (0 = cut patches in the training process).
        device: ``cpu``, ``cuda``, ``cuda:1``, ``mps``; ``None`` chooses.
        progress_every: optimizer steps between ``step`` events.
        checkpoint_dir: where resumable state goes; default ``<out>.checkpoint`` beside ``out``.
        resume: continue from ``checkpoint_dir``.
        stop_file: stop (resumably) when this file appears.
        overwrite: replace an existing ``out`` and discard a stale checkpoint.
        keep_checkpoint: keep the checkpoint after a successful run.
    """

    manifest: Path
    out: Path
    backbone: str = "dinov2_vits14"
    weights: Path | None = None
    random_init: bool = False
    mode: str = "lora"
    lora: LoraSpec = field(default_factory=LoraSpec)
    patch_spec: PatchSpec | None = None
    epochs: int = 20
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    patience: int = 5
    folds: int | None = None
    val_fraction: float = 0.2
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    name: str | None = None
    num_workers: int = 0
    device: str | None = None
    progress_every: int = 10
    checkpoint_dir: Path | None = None
    resume: bool = False
    stop_file: Path | None = None
    overwrite: bool = False
    keep_checkpoint: bool = False

    def __post_init__(self) -> None:
        self.manifest = Path(self.manifest)
        self.out = Path(self.out)
        self.weights = Path(self.weights) if self.weights is not None else None
        self.stop_file = Path(self.stop_file) if self.stop_file is not None else None
        self.checkpoint_dir = (Path(self.checkpoint_dir) if self.checkpoint_dir is not None
                               else self.out.with_name(self.out.name + ".checkpoint"))
        problems = []
        if self.mode not in DEFAULT_LR:
            problems.append(f"mode {self.mode!r} is not lora, full or linear")
        for name in ("epochs", "batch_size", "grad_accum", "patience", "progress_every"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"learning rate must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.folds is not None and int(self.folds) < 2:
            problems.append(f"folds must be at least 2, got {self.folds}")
        if self.num_workers < 0:
            problems.append(f"num_workers must be ≥ 0, got {self.num_workers}")
        if problems:
            raise DatasetError("invalid training configuration: " + "; ".join(problems))

    @property
    def peak_lr(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[self.mode])

    def identity(self) -> dict:
        """The settings a resumed run must share with the stopped one."""
        keep = ("backbone", "random_init", "mode", "epochs", "batch_size", "grad_accum", "weight_decay",
                "warmup_fraction", "max_grad_norm", "patience", "folds", "val_fraction", "seed")
        out = {k: getattr(self, k) for k in keep}
        out.update(lr=self.peak_lr, lora=self.lora.to_dict() if self.mode == "lora" else None,
                   augment=self.augment.to_dict(), patch_spec=self.patch_spec.to_dict() if self.patch_spec else None)
        return jsonable(out)


@dataclass
class TrainResult:
    """What ``train`` returns: ``status`` is ``done`` or ``stopped`` (resumable)."""

    status: str
    adapter: Path | None = None
    checkpoint: Path | None = None
    metrics: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    folds: list = field(default_factory=list)


# --- processes and stopping ---------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(preferred_device: str | None) -> tuple[DistContext, bool]:
    """Join the torchrun job described by the environment; returns (context, we initialised it)."""
    from ..device import choose_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=choose_device(preferred_device)), False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(preferred_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    started = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), device=device), started


class StopSignal:
    """Set by SIGINT/SIGTERM or by a stop file; the loop stops after the current optimizer step."""

    def __init__(self, stop_file: Path | None = None) -> None:
        self.stop_file = stop_file
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame) -> None:
        log.info("received %s: stopping after the current step", signal.Signals(signum).name)
        self._event.set()

    def request(self) -> None:
        self._event.set()

    def local(self) -> bool:
        return self._event.is_set() or (self.stop_file is not None and self.stop_file.exists())


def _step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def warmup_cosine(total_steps: int, warmup_fraction: float):
    """LR factor per optimizer step: linear warm-up from ~0, then cosine to 0."""
    warmup = int(round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One model trained from scratch: the holdout run, a fold, or the K-fold final refit."""

    name: str
    train: np.ndarray
    val: np.ndarray  # empty for the final refit
    epochs: int


class _Stopped(Exception):
    """Raised inside the loop once the stop request has been honoured and checkpointed."""


class Trainer:
    """One training run; use ``train()``."""

    def __init__(self, config: TrainConfig, reporter: Reporter, ctx: DistContext, stop: StopSignal,
                 data: TrainingSet | None = None) -> None:
        self.config = config
        self.reporter = reporter if ctx.is_main else Reporter()
        self.ctx = ctx
        self.stop = stop
        self.data = data
        self.started = time.monotonic()
        self.elapsed_before = 0.0

    # -- setup --
    def _prepare(self) -> None:
        cfg = self.config
        if not cfg.resume:
            if cfg.out.exists() and not cfg.overwrite:
                raise DatasetError(f"{cfg.out} already exists: choose another --out, or pass --overwrite to replace it")
            if has_checkpoint(cfg.checkpoint_dir) and not cfg.overwrite:
                raise DatasetError(f"a stopped training left a checkpoint in {cfg.checkpoint_dir}: pass --resume to "
                                   "continue it, or --overwrite to start again from scratch")
            if cfg.overwrite and self.ctx.is_main:
                shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
            self._barrier()
        spec = self._spec_for_backbone()
        if self.data is None:  # every data problem is reported before a model is built
            self.data = check_training_set(cfg.manifest, reach_mm=patch_reach_mm(spec, cfg.augment))
        self.labels = self.data.labels
        self._stages({})  # refuses impossible splits now, not after loading the backbone
        torch.manual_seed(cfg.seed)
        self.model, self.info = build_model(cfg.backbone, patch_spec=spec,
                                            mode=cfg.mode, lora=cfg.lora if cfg.mode == "lora" else None,
                                            weights=cfg.weights, allow_random_init=cfg.random_init)
        self.spec = self.model.patch_spec
        self.model.to(self.ctx.device)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.initial = self._snapshot()
        self.identity = jsonable({**cfg.identity(), "patch_spec": self.spec.to_dict(), "world_size": self.ctx.world,
                                  "backbone_identity": self.info.identity, "data": _data_fingerprint(self.data),
                                  "frozen": _frozen_fingerprint(self.model, self.trainable)})
        self.train_ds = PatchDataset(self.data, self.spec, cfg.augment, seed=cfg.seed)
        self.eval_ds = PatchDataset(self.data, self.spec, None)

    def _spec_for_backbone(self) -> PatchSpec:
        if self.config.patch_spec is not None:
            return self.config.patch_spec
        from ..models import get_backbone_config

        backbone = get_backbone_config(self.config.backbone)
        pixels = min(backbone.img_size, DEFAULT_PIXELS)
        return PatchSpec(views="multiview9", fov_mm=50.0, pixels=pixels)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.trainable.items()}

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        missing = set(self.trainable) - set(weights)
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); "
                                  "it was made for another model configuration")
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(weights[name].to(param.device, param.dtype))

    def _stages(self, progress: dict) -> list[Stage]:
        cfg = self.config
        pids = self.data.patient_ids
        if cfg.folds:
            splits = kfold_splits(pids, self.labels, int(cfg.folds), cfg.seed)
            stages = [Stage(s.name, s.train, s.val, cfg.epochs) for s in splits]
            final_epochs = progress.get("final_epochs") or cfg.epochs
            stages.append(Stage("final", np.arange(len(self.labels)), np.array([], dtype=int), int(final_epochs)))
            return stages
        split: Split = holdout_split(pids, self.labels, cfg.val_fraction, cfg.seed)
        return [Stage("holdout", split.train, split.val, cfg.epochs)]

    # -- batches --
    def _micro_batches(self, stage_index: int, stage: Stage, epoch: int) -> list[list[list[int]]]:
        """This process's optimizer steps for an epoch, each a list of micro-batches of sample indices."""
        sampler = DistributedSampler(range(len(stage.train)), num_replicas=self.ctx.world, rank=self.ctx.rank,
                                     shuffle=True, seed=_step_seed(self.config.seed, stage_index) % (2 ** 31))
        sampler.set_epoch(epoch)
        order = [int(stage.train[i]) for i in sampler]
        b, accum = self.config.batch_size, self.config.grad_accum
        micro = [order[i:i + b] for i in range(0, len(order), b)]
        return [micro[i:i + accum] for i in range(0, len(micro), accum)]

    def _loader(self, micro_batches: list[list[int]], dataset: PatchDataset) -> DataLoader:
        workers = self.config.num_workers
        return DataLoader(dataset, batch_sampler=micro_batches, num_workers=workers,
                          worker_init_fn=ignore_sigint_in_worker if workers else None,
                          pin_memory=self.ctx.device.type == "cuda")

    def _autocast(self):
        if self.ctx.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # -- evaluation --
    @torch.no_grad()
    def predict(self, indices: np.ndarray) -> np.ndarray:
        """Logits of ``indices`` (deterministic patches), computed across all processes."""
        model = self.model
        model.eval()
        mine = [int(i) for i in indices[self.ctx.rank::self.ctx.world]]
        batches = [mine[i:i + 2 * self.config.batch_size] for i in range(0, len(mine), 2 * self.config.batch_size)]
        pairs: list[tuple[int, float]] = []
        for patches, _labels, index in self._loader(batches, self.eval_ds):
            with self._autocast():
                logits = model(patches.to(self.ctx.device, non_blocking=True))
            pairs.extend(zip(index.tolist(), logits.float().cpu().tolist()))
        if self.ctx.active:
            gathered: list = [None] * self.ctx.world
            dist.all_gather_object(gathered, pairs)
            pairs = [p for part in gathered for p in part]
        by_index = dict(pairs)
        return np.array([by_index[int(i)] for i in indices], dtype=np.float64)

    # -- stopping --
    def _stop_requested(self) -> bool:
        flag = self.stop.local()
        if self.ctx.active:
            t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def _collective_device(self) -> torch.device:
        return self.ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _barrier(self) -> None:
        if self.ctx.active:
            dist.barrier()

    def _elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def _checkpoint(self, progress: dict, optimizer, scheduler, best_weights) -> Path:
        path = self.config.checkpoint_dir / "state.json"
        if self.ctx.is_main:
            progress = {**progress, "elapsed_s": self._elapsed()}
            path = save_checkpoint(self.config.checkpoint_dir, weights=self._snapshot(), best_weights=best_weights,
                                   optimizer=optimizer, scheduler=scheduler, progress=progress,
                                   config={"identity": self.identity, "settings": _settings(self.config)})
        self._barrier()
        return path

    # -- one stage --
    def _run_stage(self, stage_index: int, stage: Stage, progress: dict, resume_from) -> dict:
        cfg = self.config
        has_val = len(stage.val) > 0
        steps_per_epoch = len(self._micro_batches(stage_index, stage, 0))
        total_steps = steps_per_epoch * stage.epochs
        decay, no_decay = [], []
        for name, p in self.trainable.items():
            (decay if p.ndim >= 2 else no_decay).append(p)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.peak_lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup_fraction))
        best_weights = None
        if resume_from is not None:
            self._load_weights(resume_from.group("model"))
            restore_optimizer(optimizer, resume_from)
            scheduler.load_state_dict(resume_from.meta["scheduler"])
            best = resume_from.group("best")
            best_weights = best or None
        else:
            self._load_weights(self.initial)
            progress.update(epoch=0, step_in_epoch=0, loss_sum=0.0, loss_count=0, best=None)
        model: nn.Module = self.model
        ddp = nn.parallel.DistributedDataParallel(model) if self.ctx.active else None
        forward = ddp or model
        pos_weight = _pos_weight(self.labels[stage.train])
        criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=self.ctx.device))
        history = progress["history"].setdefault(stage.name, [])
        self.reporter.emit("start", stage=stage.name, stage_index=stage_index, stages=progress["stages"],
                           train_size=int(len(stage.train)), val_size=int(len(stage.val)),
                           train_malignant=int(self.labels[stage.train].sum()),
                           val_malignant=int(self.labels[stage.val].sum()) if has_val else 0,
                           patients_train=len({self.data.patient_ids[i] for i in stage.train}),
                           patients_val=len({self.data.patient_ids[i] for i in stage.val}),
                           trainable_parameters=trainable_parameter_count(model)[0],
                           total_parameters=trainable_parameter_count(model)[1],
                           epochs=stage.epochs, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                           resumed_step=progress["epoch"] * steps_per_epoch + progress["step_in_epoch"],
                           processes=self.ctx.world, device=str(self.ctx.device), backbone=self.info.name,
                           random_init=self.info.random_init, mode=cfg.mode, pos_weight=pos_weight)
        epoch_times: list[float] = []
        if self._stop_requested():
            raise _Stopped(self._checkpoint(progress, optimizer, scheduler, best_weights))
        while progress["epoch"] < stage.epochs:
            epoch = progress["epoch"]
            epoch_start = time.monotonic()
            steps = self._micro_batches(stage_index, stage, epoch)
            first = progress["step_in_epoch"]
            self.train_ds.set_epoch(_step_seed(stage_index, epoch) % (2 ** 31))
            loader = iter(self._loader([mb for step in steps[first:] for mb in step], self.train_ds))
            window_images, window_start = 0, time.monotonic()
            model.train()
            for step_index in range(first, len(steps)):
                torch.manual_seed(_step_seed(cfg.seed, stage_index, epoch, step_index, self.ctx.rank))
                step_size = sum(len(mb) for mb in steps[step_index])
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for micro_index in range(len(steps[step_index])):
                    patches, labels, _ = next(loader)
                    patches = patches.to(self.ctx.device, non_blocking=True)
                    labels = labels.to(self.ctx.device, non_blocking=True)
                    last = micro_index == len(steps[step_index]) - 1
                    with (nullcontext() if ddp is None or last else ddp.no_sync()), self._autocast():
                        logits = forward(patches)
                        loss = criterion(logits.float(), labels) * (len(labels) / step_size)
                    loss.backward()
                    step_loss += float(loss.detach())
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                if not math.isfinite(step_loss):
                    raise DatasetError(f"training loss became {step_loss} at epoch {epoch + 1}, step {step_index + 1}: "
                                       "lower the learning rate (--lr)")
                progress["step_in_epoch"] = step_index + 1
                progress["loss_sum"] += step_loss
                progress["loss_count"] += 1
                window_images += step_size * self.ctx.world
                global_step = epoch * steps_per_epoch + step_index + 1
                if global_step % cfg.progress_every == 0:
                    now = time.monotonic()
                    self.reporter.emit("step", stage=stage.name, epoch=epoch + 1, epochs=stage.epochs,
                                       step=step_index + 1, steps_per_epoch=steps_per_epoch,
                                       global_step=global_step, total_steps=total_steps, loss=step_loss,
                                       lr=scheduler.get_last_lr()[0],
                                       images_per_s=window_images / max(now - window_start, 1e-9))
                    window_images, window_start = 0, now
                if self._stop_requested():
                    raise _Stopped(self._checkpoint(progress, optimizer, scheduler, best_weights))
            train_loss = progress["loss_sum"] / max(progress["loss_count"], 1)
            if self.ctx.active:
                t = torch.tensor([train_loss], device=self._collective_device(), dtype=torch.float64)
                dist.all_reduce(t)
                train_loss = float(t.item()) / self.ctx.world
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "val_auc": None,
                                      "val_loss": None, "best": False}
            if has_val:
                val_logits = self.predict(stage.val)
                val_labels = self.labels[stage.val]
                record["val_auc"] = M.roc_auc(val_labels, val_logits)
                record["val_loss"] = M.binary_nll(val_labels, val_logits)
                if _improves(record, progress["best"]):
                    progress["best"] = {"epoch": epoch + 1, "auc": record["val_auc"], "loss": record["val_loss"],
                                        "since": 0, "val_logits": val_logits.tolist()}
                    best_weights = self._snapshot()
                    record["best"] = True
                else:
                    progress["best"]["since"] += 1
            history.append(record)
            progress.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, loss_count=0)
            epoch_times.append(time.monotonic() - epoch_start)
            early = has_val and progress["best"]["since"] >= cfg.patience
            remaining = 0 if early else stage.epochs - epoch - 1
            remaining += sum(cfg.epochs for _ in range(stage_index + 1, progress["stages"]))
            self.reporter.emit("epoch", stage=stage.name, epoch=epoch + 1, epochs=stage.epochs,
                               global_step=(epoch + 1) * steps_per_epoch,
                               train_loss=train_loss, val_auc=record["val_auc"], val_loss=record["val_loss"],
                               best_epoch=(progress["best"] or {}).get("epoch"), elapsed_s=self._elapsed(),
                               eta_s=float(np.mean(epoch_times[-3:])) * remaining)
            if early:
                progress["epoch"] = stage.epochs  # patience exhausted: this stage is finished
            path = self._checkpoint(progress, optimizer, scheduler, best_weights)
            self.reporter.emit("checkpoint", stage=stage.name, epoch=epoch + 1, checkpoint=path)
            if self._stop_requested():
                raise _Stopped(path)
        if has_val:
            self._load_weights(best_weights)
            best = progress["best"]
            return {"name": stage.name, "best_epoch": best["epoch"], "best_auc": best["auc"],
                    "epochs_run": len(history), "val_indices": stage.val.tolist(), "val_logits": best["val_logits"]}
        return {"name": stage.name, "best_epoch": None, "best_auc": None, "epochs_run": len(history),
                "val_indices": [], "val_logits": []}

    # -- everything --
    def run(self) -> TrainResult:
        cfg = self.config
        self._prepare()
        checkpoint = None
        progress: dict[str, Any] = {"stage": 0, "history": {}, "folds": [], "final_epochs": None}
        if cfg.resume:
            checkpoint = load_checkpoint(cfg.checkpoint_dir)
            _check_identity(checkpoint.meta["config"]["identity"], self.identity, cfg.checkpoint_dir)
            progress = checkpoint.meta["progress"]
            self.elapsed_before = float(progress.get("elapsed_s", 0.0))
            set_rng_state(checkpoint.meta["rng"], checkpoint)
        stages = self._stages(progress)
        progress["stages"] = len(stages)
        try:
            while progress["stage"] < len(stages):
                index = progress["stage"]
                stage = self._stages(progress)[index]  # the final refit's length is known only after the folds
                result = self._run_stage(index, stage, progress, checkpoint)
                checkpoint = None
                progress["folds"].append(result)
                if cfg.folds and stage.name != "final":
                    done = [f["best_epoch"] for f in progress["folds"]]
                    progress["final_epochs"] = max(1, int(round(float(np.mean(done)))))
                progress["stage"] = index + 1
        except _Stopped as stopped:
            self.reporter.emit("stopped", checkpoint=stopped.args[0], stage=progress["stage"],
                               epoch=progress.get("epoch"), step=progress.get("step_in_epoch"),
                               resume=f"rerun with --resume to continue from {cfg.checkpoint_dir}")
            if self.ctx.is_main and cfg.stop_file is not None:
                cfg.stop_file.unlink(missing_ok=True)
            self._barrier()
            return TrainResult(status="stopped", checkpoint=Path(stopped.args[0]), history=progress["history"],
                               folds=progress["folds"])
        return self._finish(progress)

    def _finish(self, progress: dict) -> TrainResult:
        cfg = self.config
        folds = [f for f in progress["folds"] if f["best_epoch"] is not None]
        indices = np.array([i for f in folds for i in f["val_indices"]], dtype=int)
        logits = np.array([v for f in folds for v in f["val_logits"]], dtype=float)
        labels = self.labels[indices]
        overall = M.evaluate(labels, logits, seed=cfg.seed)
        per_fold = []
        for f in folds:
            fold_labels = self.labels[np.asarray(f["val_indices"], dtype=int)]
            fold_metrics = M.evaluate(fold_labels, np.asarray(f["val_logits"]), temperature=overall.temperature,
                                      threshold=overall.threshold, seed=cfg.seed)
            per_fold.append({"name": f["name"], "best_epoch": f["best_epoch"], "epochs_run": f["epochs_run"],
                             **fold_metrics.to_dict()})
        metrics = {"validation": "out-of-fold" if cfg.folds else "holdout", **overall.to_dict()}
        if cfg.folds:
            metrics["folds"] = per_fold
            metrics["fold_auc_mean"] = float(np.mean([f["auc"] for f in per_fold]))
            metrics["fold_auc_std"] = float(np.std([f["auc"] for f in per_fold]))
        training = self._training_summary(progress)
        predictions = [{"nodule_id": self.data.samples[i].nodule_id, "patient_id": self.data.samples[i].patient_id,
                        "row": self.data.samples[i].row, "label": int(self.labels[i]), "logit": float(z),
                        "probability": float(M.sigmoid(z / overall.temperature))} for i, z in zip(indices, logits)]
        adapter = None
        if self.ctx.is_main:
            adapter = write_adapter(self.model, cfg, self.info, self.spec, overall, metrics, training,
                                    progress["history"], labels, logits, predictions)
            if not cfg.keep_checkpoint:
                shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
        self._barrier()
        adapter = adapter or cfg.out
        self.reporter.emit("done", adapter=adapter, metrics=metrics, elapsed_s=self._elapsed())
        return TrainResult(status="done", adapter=adapter, metrics=metrics, history=progress["history"],
                           folds=per_fold)

    def _training_summary(self, progress: dict) -> dict:
        cfg = self.config
        summary = self.data.summary()
        return jsonable({
            "manifest": str(cfg.manifest), "nodules": summary["nodules"], "benign": summary["benign"],
            "malignant": summary["malignant"], "patients": summary["patients"], "excluded": summary["excluded"],
            "split": f"{cfg.folds}-fold by patient, refit on all data" if cfg.folds
            else f"holdout {cfg.val_fraction:g} of patients",
            "epochs_run": {f["name"]: f["epochs_run"] for f in progress["folds"]},
            "best_epoch": {f["name"]: f["best_epoch"] for f in progress["folds"] if f["best_epoch"]},
            "final_epochs": progress.get("final_epochs"), "seed": cfg.seed, "lr": cfg.peak_lr,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": self.ctx.world,
            "weight_decay": cfg.weight_decay, "augment": cfg.augment.to_dict(),
            "trainable_parameters": trainable_parameter_count(self.model)[0],
            "elapsed_s": round(self._elapsed(), 1), "device": str(self.ctx.device)})


def _improves(record: dict, best: dict | None) -> bool:
    """Higher validation AUC wins; equal AUC (often 1.0 on small sets) falls back to lower loss."""
    if best is None:
        return True
    if record["val_auc"] != best["auc"]:
        return bool(record["val_auc"] > best["auc"])
    return bool(record["val_loss"] < best["loss"])


def _pos_weight(labels: np.ndarray) -> float:
    """n_benign / n_malignant: each class contributes equally to the loss."""
    positives = int(labels.sum())
    return float((len(labels) - positives) / positives) if positives else 1.0


def _data_fingerprint(data: TrainingSet) -> str:
    digest = hashlib.sha256()
    for s in data.samples:
        digest.update(json.dumps([s.image_key, list(s.centre_lps), s.label, s.patient_id]).encode())
    return digest.hexdigest()


def _frozen_fingerprint(model: nn.Module, trainable: dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name not in trainable:
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _settings(cfg: TrainConfig) -> dict:
    nested = ("lora", "augment", "patch_spec")  # recorded in the identity
    return jsonable({f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in nested})


def _check_identity(saved: dict, current: dict, directory: Path) -> None:
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differ:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in differ
                           if k not in ("data", "frozen"))
        if "data" in differ:
            detail += "; the manifest's nodules, labels or images changed"
        if "frozen" in differ:
            detail += "; the backbone's frozen weights differ"
        raise CheckpointError(f"the checkpoint in {directory} was made with other settings ({detail.strip('; ')}). "
                              "Resume with the same options, or start again with --overwrite.")


# --- output -------------------------------------------------------------------------------------


def write_adapter(model, cfg: TrainConfig, info, spec: PatchSpec, overall: M.Metrics, metrics: dict,
                  training: dict, history: dict, labels: np.ndarray, logits: np.ndarray,
                  predictions: list[dict]) -> Path:
    """Save adapter + reports in a staging folder, then move it into place in one rename.

    A run killed before the rename leaves only a hidden staging folder; ``out`` is either
    absent, the previous adapter, or this complete one.
    """
    from ..adapters import AdapterManifest, save_adapter
    from .reports import plot_calibration, plot_roc, plot_training_curves

    out = cfg.out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    manifest = AdapterManifest(
        name=cfg.name or out.name, backbone=info.name, backbone_sha256=info.identity, random_init=info.random_init,
        random_init_fingerprint=info.random_init_fingerprint, patch_spec=spec.to_dict(),
        lora=cfg.lora.to_dict() if cfg.mode == "lora" else None, mode=cfg.mode,
        threshold=float(overall.threshold), temperature=float(overall.temperature), training=training,
        metrics=jsonable(metrics))
    try:
        save_adapter(model, manifest, staging)
        write_json_atomic(staging / "metrics.json", jsonable({"metrics": metrics, "history": history,
                                                              "training": training, "validation_predictions": predictions}))
        plot_roc(staging / "roc.png", labels, logits, overall)
        plot_calibration(staging / "calibration.png", labels, logits, overall.temperature)
        plot_training_curves(staging / "training_curves.png", history)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def train(config: TrainConfig, reporter: Reporter | None = None, *, data: TrainingSet | None = None,
          stop: StopSignal | None = None) -> TrainResult:
    """Train (or resume) as ``config`` says; report events to ``reporter``.

    Joins a torchrun job when launched by one. Returns ``status="stopped"`` with a
    resumable checkpoint when stopped by SIGINT/SIGTERM, the stop file or ``stop.request()``.
    Raises MedLoRAError for bad input (after reporting an ``error`` event).
    """
    reporter = reporter or Reporter()
    ctx, started = init_distributed(config.device)
    stop = stop or StopSignal(config.stop_file)
    if stop.stop_file is None:
        stop.stop_file = config.stop_file
    stop.install()
    try:
        return Trainer(config, reporter, ctx, stop, data).run()
    except MedLoRAError as exc:
        if ctx.is_main:
            reporter.emit("error", message=str(exc), type=type(exc).__name__)
        raise
    except Exception as exc:
        if ctx.is_main:
            reporter.emit("error", message=f"{type(exc).__name__}: {exc}", type=type(exc).__name__, unexpected=True)
        raise
    finally:
        stop.uninstall()
        if started:
            dist.destroy_process_group()
