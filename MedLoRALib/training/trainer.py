"""The training run: outputs checked and locked, the model built, stages trained, the adapter written.

Python API::

    from MedLoRALib.training.config import TrainConfig
    from MedLoRALib.training.trainer import train
    result = train(TrainConfig(manifest="cohort.csv", out="my_adapter", backbone="medlora_tiny",
                               random_init=True, epochs=8), reporter)

The jobs live in their own modules: the options (``config``), the epoch loop (``loop``), the
optimizer, schedule and batch order (``schedule``), processes and stopping (``processes``),
checkpoints (``checkpoint``), metrics of a finished run (``evaluation``) and the adapter folder
(``output``). This module ties them together.

Reproducibility: every random draw is derived from (seed, stage, epoch, step) — the
batch order, each sample's augmentation and the dropout of each optimizer step — so a run
stopped after any step and resumed reaches bit-identical weights on CPU.

K-fold mode (``folds=K``): each fold trains with early stopping; the out-of-fold logits of
every fold's best epoch give the reported metrics, the temperature and the threshold; the
adapter itself is then retrained on all data for the mean best epoch count (every nodule
contributes to the shipped weights, and its calibration comes from data it never saw).

Outputs: ``out`` and the checkpoint folder are locked for the whole run (a second training of
the same output is refused), and only folders MedLoRA marked as its own are ever replaced or
removed (``outputs.check_replaceable``).
"""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..adapters.store import check_name
from ..errors import AdapterError, DatasetError, MedLoRAError, OutputError, os_error_reason
from ..locks import OutputLock
from ..models import build_model, trainable_parameter_count
from ..outputs import ADAPTER, CHECKPOINT, check_replaceable
from ..patches import PatchSpec
from .augment import patch_reach_mm
from .checkpoint import (
    CheckpointError,
    check_identity,
    data_fingerprint,
    frozen_fingerprint,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .config import PatchOptions, TrainConfig
from .dataset import PatchDataset, ignore_sigint_in_worker
from .evaluation import pooled_evaluation
from .loop import Stage, StageLoop, Stopped
from .manifest import TrainingSet, check_training_set, read_rows
from .output import AdapterReport, adapter_manifest, write_adapter
from .processes import DistContext, StopSignal, init_distributed
from .progress import Reporter, jsonable
from .schedule import warmup_cosine
from .splits import Split, holdout_split, kfold_splits

__all__ = ["TrainConfig", "TrainResult", "Trainer", "StopSignal", "train", "warmup_cosine"]


@dataclass
class TrainResult:
    """What ``train`` returns: ``status`` is ``done`` or ``stopped`` (resumable)."""

    status: str
    adapter: Path | None = None
    checkpoint: Path | None = None
    metrics: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    folds: list = field(default_factory=list)


class Trainer:
    """One training run; use ``train()``. Holds the model and data the stage loops share."""

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
    def _check_outputs(self) -> None:
        """Refuse outputs MedLoRA must not replace, and existing ones without --overwrite/--resume."""
        cfg = self.config
        try:  # the adapter's name is checked now, not after the run when the adapter is written
            check_name(cfg.name or cfg.out.name)
        except AdapterError as exc:
            raise DatasetError(f"{exc}; pass --name" + (" with such a name" if cfg.name else
                                                         f" (the default is --out's folder name, {cfg.out.name!r})")
                               ) from None
        checkpoints = cfg.checkpoint_folder
        rows, _problems = read_rows(cfg.manifest)
        inputs = [cfg.manifest, *(r.image for r in rows), *(r.annotations for r in rows if r.annotations)]
        if cfg.weights is not None:
            inputs.append(cfg.weights)
        check_replaceable(cfg.out, option="--out", inputs=inputs, kind=ADAPTER)
        check_replaceable(checkpoints, option="--checkpoint-dir" if cfg.checkpoint_dir else "the checkpoint folder",
                          inputs=inputs, kind=CHECKPOINT)
        if not cfg.resume:
            if cfg.out.exists() and not cfg.overwrite:
                raise DatasetError(f"{cfg.out} already exists: choose another --out, or pass --overwrite to replace it")
            if has_checkpoint(checkpoints) and not cfg.overwrite:
                raise DatasetError(f"a stopped training left a checkpoint in {checkpoints}: pass --resume to "
                                   "continue it, or --overwrite to start again from scratch")
        if cfg.overwrite and not cfg.resume and self.ctx.is_main:
            shutil.rmtree(checkpoints, ignore_errors=True)

    def _prepare(self) -> None:
        cfg = self.config
        self._check_outputs()
        self.ctx.barrier()
        spec = cfg.patch_spec or PatchOptions().spec(cfg.backbone)
        if self.data is None:  # every data problem is reported before a model is built
            self.data = check_training_set(cfg.manifest, reach_mm=patch_reach_mm(spec, cfg.augment))
        self.labels = self.data.labels
        self._stages({})  # refuses impossible splits now, not after loading the backbone
        torch.manual_seed(cfg.seed)
        self.model, self.info = build_model(cfg.backbone, patch_spec=spec,
                                            mode=cfg.mode, lora=cfg.lora if cfg.mode == "lora" else None,
                                            weights=cfg.weights, allow_random_init=cfg.random_init)
        self.spec: PatchSpec = self.model.patch_spec
        self.model.to(self.ctx.device)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.initial = self.snapshot()
        self.identity = jsonable({**cfg.identity(), "patch_spec": self.spec.to_dict(), "world_size": self.ctx.world,
                                  "backbone_identity": self.info.identity, "data": data_fingerprint(self.data.samples),
                                  "frozen": frozen_fingerprint(self.model, self.trainable)})
        self.train_ds = PatchDataset(self.data, self.spec, cfg.augment, seed=cfg.seed)
        self.eval_ds = PatchDataset(self.data, self.spec, None)

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

    # -- what the stage loop uses --
    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.trainable.items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        missing = set(self.trainable) - set(weights)
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); "
                                  "it was made for another model configuration")
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(weights[name].to(param.device, param.dtype))

    def loader(self, micro_batches: list[list[int]], dataset: PatchDataset) -> DataLoader:
        workers = self.config.num_workers
        return DataLoader(dataset, batch_sampler=micro_batches, num_workers=workers,
                          worker_init_fn=ignore_sigint_in_worker if workers else None,
                          pin_memory=self.ctx.device.type == "cuda")

    def autocast(self):
        if self.ctx.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def predict(self, indices: np.ndarray) -> np.ndarray:
        """Logits of ``indices`` (deterministic patches), computed across all processes."""
        model = self.model
        model.eval()
        mine = [int(i) for i in indices[self.ctx.rank::self.ctx.world]]
        size = 2 * self.config.batch_size
        pairs: list[tuple[int, float]] = []
        for patches, _labels, index in self.loader([mine[i:i + size] for i in range(0, len(mine), size)],
                                                   self.eval_ds):
            with self.autocast():
                logits = model(patches.to(self.ctx.device, non_blocking=True))
            pairs.extend(zip(index.tolist(), logits.float().cpu().tolist()))
        by_index = dict(self.ctx.gather(pairs))
        return np.array([by_index[int(i)] for i in indices], dtype=np.float64)

    def stop_requested(self) -> bool:
        return self.ctx.any(self.stop.local())

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def checkpoint(self, progress: dict, optimizer, scheduler, best_weights) -> Path:
        folder = self.config.checkpoint_folder
        path = folder / "state.json"
        if self.ctx.is_main:
            progress = {**progress, "elapsed_s": self.elapsed()}
            try:
                path = save_checkpoint(folder, weights=self.snapshot(), best_weights=best_weights,
                                       optimizer=optimizer, scheduler=scheduler, progress=progress,
                                       config={"identity": self.identity, "settings": self.config.settings()})
            except OSError as exc:
                raise OutputError(f"could not write the training checkpoint to {folder}: {os_error_reason(exc)}. "
                                  "The previous checkpoint there is intact; free space or make the folder "
                                  "writable, then rerun with --resume.") from exc
        self.ctx.barrier()
        return path

    # -- everything --
    def run(self) -> TrainResult:
        cfg = self.config
        self._prepare()
        checkpoint = None
        progress: dict[str, Any] = {"stage": 0, "history": {}, "folds": [], "final_epochs": None}
        if cfg.resume:
            checkpoint = load_checkpoint(cfg.checkpoint_folder)
            check_identity(checkpoint.meta["config"]["identity"], self.identity, cfg.checkpoint_folder)
            progress = checkpoint.meta["progress"]
            self.elapsed_before = float(progress.get("elapsed_s", 0.0))
            set_rng_state(checkpoint.meta["rng"], checkpoint)
        progress["stages"] = len(self._stages(progress))
        try:
            while progress["stage"] < progress["stages"]:
                index = progress["stage"]
                stage = self._stages(progress)[index]  # the final refit's length is known only after the folds
                result = StageLoop(self, index, stage, progress, checkpoint).run()
                checkpoint = None
                progress["folds"].append(result)
                if cfg.folds and stage.name != "final":
                    done = [f["best_epoch"] for f in progress["folds"]]
                    progress["final_epochs"] = max(1, int(round(float(np.mean(done)))))
                progress["stage"] = index + 1
        except Stopped as stopped:
            self.reporter.emit("stopped", checkpoint=stopped.args[0], stage=progress["stage"],
                               epoch=progress.get("epoch"), step=progress.get("step_in_epoch"),
                               resume=f"rerun with --resume to continue from {cfg.checkpoint_folder}")
            if self.ctx.is_main and cfg.stop_file is not None:
                cfg.stop_file.unlink(missing_ok=True)
            self.ctx.barrier()
            return TrainResult(status="stopped", checkpoint=Path(stopped.args[0]), history=progress["history"],
                               folds=progress["folds"])
        return self._finish(progress)

    def _finish(self, progress: dict) -> TrainResult:
        cfg = self.config
        evaluation = pooled_evaluation(progress["folds"], self.data, kfold=bool(cfg.folds), seed=cfg.seed)
        training = self._training_summary(progress)
        adapter = None
        if self.ctx.is_main:
            manifest = adapter_manifest(cfg, self.info, self.spec, evaluation, training)
            adapter = write_adapter(self.model, manifest, cfg.out,
                                    AdapterReport(evaluation=evaluation, training=training,
                                                  history=progress["history"]))
            if not cfg.keep_checkpoint:
                shutil.rmtree(cfg.checkpoint_folder, ignore_errors=True)
        self.ctx.barrier()
        adapter = adapter or cfg.out
        self.reporter.emit("done", adapter=adapter, metrics=evaluation.metrics, elapsed_s=self.elapsed())
        return TrainResult(status="done", adapter=adapter, metrics=evaluation.metrics, history=progress["history"],
                           folds=evaluation.per_fold)

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
            "elapsed_s": round(self.elapsed(), 1), "device": str(self.ctx.device)})


def _output_locks(config: TrainConfig, ctx: DistContext) -> ExitStack:
    """Lock ``out`` and the checkpoint folder for the run (rank 0 only: the other ranks are its helpers)."""
    stack = ExitStack()
    if ctx.is_main:
        try:
            for folder in (config.out, config.checkpoint_folder):
                stack.enter_context(OutputLock(folder, activity="trained"))
        except BaseException:
            stack.close()
            raise
    return stack


def train(config: TrainConfig, reporter: Reporter | None = None, *, data: TrainingSet | None = None,
          stop: StopSignal | None = None) -> TrainResult:
    """Train (or resume) as ``config`` says; report events to ``reporter``.

    Joins a torchrun job when launched by one. Returns ``status="stopped"`` with a
    resumable checkpoint when stopped by SIGINT/SIGTERM, the stop file or ``stop.request()``.
    Raises MedLoRAError for bad input (after reporting an ``error`` event); ``locks.OutputBusyError``
    when another process is training into the same ``out`` or checkpoint folder.
    """
    reporter = reporter or Reporter()
    ctx, started = init_distributed(config.device)
    stop = stop or StopSignal(config.stop_file)
    if stop.stop_file is None:
        stop.stop_file = config.stop_file
    stop.install()
    try:
        config.require_paths()
        if config.threads:
            torch.set_num_threads(config.threads)
        with _output_locks(config, ctx):
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
            import torch.distributed as dist

            dist.destroy_process_group()
