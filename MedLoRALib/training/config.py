"""Every training option in one place: ``TrainConfig``, its defaults, its checks and its flags.

The ``medlora train`` command line is generated from the dataclass fields (each field's
``metadata`` names its flag and help; ``options()``), and ``TrainConfig.cli_args()`` turns a
configuration back into the arguments of that command line, so a caller that launches training
as a child process (Slicer) builds the same configuration and passes only what differs from the
defaults. No torch: Slicer's process imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from ..lora_spec import LoraSpec, option
from ..outputs import protected_reason
from ..patches import PatchSpec
from ..tta import NEW_ADAPTER_TTA, TTA_SETS, TTAError, check_tta_name
from .augment import AugmentConfig
from .progress import jsonable

DEFAULT_LR = {"lora": 1e-3, "full": 1e-4, "linear": 1e-3}
DEFAULT_PIXELS = 112  # 8 DINOv2 patches of 14 px; backbones trained at less use their own size
MODES = tuple(DEFAULT_LR)


@dataclass(frozen=True)
class PatchOptions:
    """The crop as the command line gives it; ``pixels=None`` = the backbone's size, at most 112."""

    views: str = field(default="multiview9", metadata=option(
        "--views", "planes per nodule", choices=("axial", "ortho3", "multiview9")))
    fov_mm: float = field(default=50.0, metadata=option("--fov-mm", "patch edge in mm (default 50)"))
    pixels: int | None = field(default=None, metadata=option(
        "--pixels", "patch edge in pixels (default: backbone size, at most 112)", type=int))

    def is_default(self) -> bool:
        return self == PatchOptions()

    def spec(self, backbone: str) -> PatchSpec:
        """The PatchSpec for ``backbone`` (reads the backbone registry only when ``pixels`` is unset)."""
        if not (math.isfinite(self.fov_mm) and self.fov_mm > 0):
            raise DatasetError(f"--fov-mm must be a finite number of millimetres > 0, got {self.fov_mm}")
        pixels = self.pixels
        if pixels is None:
            from ..models import get_backbone_config

            pixels = min(get_backbone_config(backbone).img_size, DEFAULT_PIXELS)
        return PatchSpec(views=self.views, fov_mm=self.fov_mm, pixels=pixels)

    @classmethod
    def of(cls, spec: PatchSpec) -> PatchOptions:
        """The options that rebuild ``spec``; refuses a spec the command line cannot express."""
        options = cls(views=spec.views, fov_mm=spec.fov_mm, pixels=spec.pixels)
        if PatchSpec(views=spec.views, fov_mm=spec.fov_mm, pixels=spec.pixels) != spec:
            raise DatasetError(f"patch spec {spec} has settings medlora train has no option for "
                               "(only --views, --fov-mm and --pixels)")
        return options


@dataclass
class TrainConfig:
    """Everything that decides a training run (``identity()`` must match to resume).

    Each field's ``metadata`` holds its ``medlora train`` flag and help text; ``lora``,
    ``patch_spec`` and ``augment`` map to several flags (``--rank``..., ``--views``...,
    ``--no-augment``). ``manifest`` and ``out`` may stay ``None`` while a caller prepares a
    configuration, but ``train`` needs both.
    """

    manifest: Path | None = field(default=None, metadata=option(
        "--manifest", "training manifest (CSV or JSON)", type=Path, required=True, group="data"))
    out: Path | None = field(default=None, metadata=option(
        "--out", "adapter folder to write", type=Path, required=True, group="data"))
    name: str | None = field(default=None, metadata=option(
        "--name", "adapter name (default: the --out folder's name)", type=str, group="data"))
    overwrite: bool = field(default=False, metadata=option(
        "--overwrite", "replace an --out folder written by MedLoRA and discard a stale checkpoint", group="data"))
    backbone: str = field(default="dinov2_vits14", metadata=option(
        "--backbone", "backbone name (default dinov2_vits14)", group="model"))
    weights: Path | None = field(default=None, metadata=option(
        "--weights", "local backbone weights file (.safetensors)", type=Path, group="model"))
    random_init: bool = field(default=False, metadata=option(
        "--random-init", "use a seeded random backbone when no weights are found (tests and demos only)",
        aliases=("--allow-random-init",), group="model"))
    mode: str = field(default="lora", metadata=option(
        "--mode", "lora (LoRA + final norm + head), full or linear (head only)", choices=MODES, group="model"))
    lora: LoraSpec = field(default_factory=LoraSpec, metadata={"group": "model"})
    patch_spec: PatchSpec | None = field(default=None, metadata={"group": "model"})
    tta: str = field(default=NEW_ADAPTER_TTA, metadata=option(
        "--tta", f"the test-time augmentation the adapter scores with by default, recorded in its manifest: "
        f"{', '.join(TTA_SETS)} (default {NEW_ADAPTER_TTA}; d8: all eight flips/quarter turns, rot4: the four "
        "quarter turns)", type=str, group="model"))
    epochs: int = field(default=20, metadata=option("--epochs", "most epochs per stage", group="optimisation"))
    batch_size: int = field(default=16, metadata=option(
        "--batch-size", "samples per micro-batch on each process", group="optimisation"))
    grad_accum: int = field(default=1, metadata=option(
        "--grad-accum", "micro-batches per optimizer step", group="optimisation"))
    lr: float | None = field(default=None, metadata=option(
        "--lr", "peak learning rate (default 1e-3 lora/linear, 1e-4 full)", type=float, group="optimisation"))
    weight_decay: float = field(default=0.05, metadata=option(
        "--weight-decay", "AdamW decay on matrices (never on biases and norms)", group="optimisation"))
    warmup_fraction: float = field(default=0.1, metadata=option(
        "--warmup", "fraction of steps with linear warm-up", group="optimisation"))
    max_grad_norm: float = field(default=1.0, metadata=option(
        "--max-grad-norm", "gradient clipping (0 disables)", group="optimisation"))
    patience: int = field(default=5, metadata=option(
        "--patience", "epochs without better validation AUC before stopping", group="optimisation"))
    folds: int | None = field(default=None, metadata=option(
        "--folds", "K-fold cross-validation by patient, then refit on all data", type=int,
        group="optimisation", exclusive="split"))
    val_fraction: float = field(default=0.2, metadata=option(
        "--val-fraction", "holdout fraction by patient (default 0.2)", group="optimisation", exclusive="split"))
    seed: int = field(default=0, metadata=option("--seed", "the only source of randomness", group="optimisation"))
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={"group": "optimisation"})
    num_workers: int = field(default=0, metadata=option(
        "--workers", "DataLoader worker processes (default 0)", group="process"))
    threads: int | None = field(default=None, metadata=option(
        "--threads", "torch CPU threads", type=int, group="process"))
    device: str | None = field(default=None, metadata=option(
        "--device", "cpu, cuda, cuda:N, mps (default: automatic)", type=str, group="process"))
    progress_every: int = field(default=10, metadata=option(
        "--progress-every", "optimizer steps between step events", group="process"))
    checkpoint_dir: Path | None = field(default=None, metadata=option(
        "--checkpoint-dir", "default: <out>.checkpoint beside --out", type=Path, group="process"))
    resume: bool = field(default=False, metadata=option(
        "--resume", "continue from the checkpoint of a stopped run", group="process"))
    stop_file: Path | None = field(default=None, metadata=option(
        "--stop-file", "stop resumably when this file appears", type=Path, group="process"))
    keep_checkpoint: bool = field(default=False, metadata=option(
        "--keep-checkpoint", "keep the checkpoint after success", group="process"))

    def __post_init__(self) -> None:
        for name in ("manifest", "out", "weights", "stop_file", "checkpoint_dir"):
            value = getattr(self, name)
            setattr(self, name, Path(value) if value is not None else None)
        problems = self._problems()
        if problems:
            raise DatasetError("invalid training configuration: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if self.mode not in DEFAULT_LR:
            problems.append(f"mode {self.mode!r} is not lora, full or linear")
        for name in ("epochs", "batch_size", "grad_accum", "patience", "progress_every"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)} ({_flag(name)})")
        for name in ("threads", "folds"):
            value = getattr(self, name)
            least = 2 if name == "folds" else 1
            if value is not None and int(value) < least:
                problems.append(f"{name} must be at least {least}, got {value} ({_flag(name)})")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"learning rate must be > 0, got {self.lr} (--lr)")
        for name in ("weight_decay", "max_grad_norm"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number ≥ 0, got {value} ({_flag(name)})")
        if not 0.0 <= self.warmup_fraction < 1.0:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction} (--warmup)")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction must be between 0 and 1, got {self.val_fraction} (--val-fraction)")
        if int(self.seed) < 0:
            problems.append(f"seed must be ≥ 0, got {self.seed} (--seed)")
        if self.num_workers < 0:
            problems.append(f"num_workers must be ≥ 0, got {self.num_workers} (--workers)")
        try:
            check_tta_name(self.tta, "--tta")
        except TTAError as exc:
            problems.append(str(exc))
        problems += self._path_problems()
        return problems

    def _path_problems(self) -> list[str]:
        if self.out is None:
            return []
        if self.out.name in ("", ".", ".."):
            return [f"--out {self.out} names an existing folder; MedLoRA writes the adapter as a new folder: "
                    "give it a name, e.g. --out my_adapter"]
        problems = []
        reason = protected_reason(self.out)
        if reason:
            problems.append(f"--out {self.out} cannot hold an adapter because {reason}; give a new folder name")
        out, checkpoints = self.out.resolve(), self.checkpoint_folder.resolve()
        if out == checkpoints or out in checkpoints.parents or checkpoints in out.parents:
            problems.append(f"--checkpoint-dir {self.checkpoint_dir} must lie outside --out {self.out} "
                            "(and --out outside it)")
        return problems

    @property
    def checkpoint_folder(self) -> Path:
        """Where resumable state goes: ``checkpoint_dir``, else ``<out>.checkpoint`` beside ``out``."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        if self.out is None:
            raise DatasetError("no --out folder given")
        return self.out.with_name(self.out.name + ".checkpoint")

    @property
    def peak_lr(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[self.mode])

    def require_paths(self) -> None:
        missing = [_flag(name) for name in ("manifest", "out") if getattr(self, name) is None]
        if missing:
            raise DatasetError(f"training needs {' and '.join(missing)}")

    def identity(self) -> dict:
        """The settings a resumed run must share with the stopped one."""
        keep = ("backbone", "random_init", "mode", "epochs", "batch_size", "grad_accum", "weight_decay",
                "warmup_fraction", "max_grad_norm", "patience", "folds", "val_fraction", "seed")
        out = {k: getattr(self, k) for k in keep}
        out.update(lr=self.peak_lr, lora=self.lora.to_dict() if self.mode == "lora" else None,
                   augment=self.augment.to_dict(), patch_spec=self.patch_spec.to_dict() if self.patch_spec else None)
        return jsonable(out)

    def settings(self) -> dict:
        """The plain (not nested) settings, as recorded beside a checkpoint."""
        nested = ("lora", "augment", "patch_spec")  # recorded in the identity
        return jsonable({f.name: getattr(self, f.name) for f in fields(self) if f.name not in nested})

    # -- the command line --
    def cli_args(self) -> list[str]:
        """``medlora train`` arguments for every setting that differs from its default.

        ``TrainConfig.from_cli(parse(cli_args()))`` rebuilds an equal configuration.
        """
        args: list[str] = []
        for opt in options():
            value = opt.get(self)
            if value != opt.default:
                args += opt.render(value)
        if self.augment == AugmentConfig.none():
            args.append("--no-augment")
        elif self.augment != AugmentConfig():
            raise DatasetError("a custom AugmentConfig has no medlora train option (only --no-augment)")
        return args

    @classmethod
    def from_cli(cls, namespace: Any) -> TrainConfig:
        """The configuration parsed by a parser built from ``options()`` (plus ``--no-augment``)."""
        values: dict[str, Any] = {"lora": {}, "patch_spec": {}}
        for opt in options():
            value = getattr(namespace, opt.dest)
            if opt.owner is None:
                values[opt.name] = value
            else:
                values[opt.owner][opt.name] = value
        lora = LoraSpec(**values.pop("lora"))
        crop = PatchOptions(**values.pop("patch_spec"))
        spec = None if crop.is_default() else crop.spec(values["backbone"])
        augment = AugmentConfig.none() if getattr(namespace, "no_augment", False) else AugmentConfig()
        return cls(**values, lora=lora, patch_spec=spec, augment=augment)


def _flag(name: str) -> str:
    meta = next(f.metadata for f in fields(TrainConfig) if f.name == name)
    return meta.get("flag", name)


@dataclass(frozen=True)
class Option:
    """One ``medlora train`` flag: where its value lives in ``TrainConfig`` and how argparse reads it."""

    name: str  # field name in its dataclass
    owner: str | None  # None: a TrainConfig field; else the TrainConfig field holding its dataclass
    flag: str
    default: Any
    help: str
    group: str
    type: Any = None
    choices: tuple | None = None
    aliases: tuple = ()
    required: bool = False
    exclusive: str | None = None

    @property
    def dest(self) -> str:
        return self.name if self.owner is None else f"{self.owner}_{self.name}"

    @property
    def is_switch(self) -> bool:
        return isinstance(self.default, bool)

    def get(self, config: TrainConfig) -> Any:
        if self.owner is None:
            return getattr(config, self.name)
        part = getattr(config, self.owner)
        if self.owner == "patch_spec":
            part = PatchOptions() if part is None else PatchOptions.of(part)
        return getattr(part, self.name)

    def render(self, value: Any) -> list[str]:
        if self.is_switch:
            return [self.flag] if value else []
        return [self.flag, repr(value) if isinstance(value, float) else str(value)]


def _options_of(cls: type, owner: str | None, group: str | None = None) -> list[Option]:
    result = []
    instance = cls()
    for f in fields(cls):
        meta = f.metadata
        if "flag" not in meta:
            continue
        default = getattr(instance, f.name)
        result.append(Option(
            name=f.name, owner=owner, flag=meta["flag"], default=default, help=meta["help"],
            group=meta.get("group", group), type=meta.get("type", None if default is None else type(default)),
            choices=tuple(meta["choices"]) if "choices" in meta else None, aliases=tuple(meta.get("aliases", ())),
            required=bool(meta.get("required", False)), exclusive=meta.get("exclusive")))
    return result


@cache
def options() -> tuple[Option, ...]:
    """Every ``medlora train`` flag that sets a ``TrainConfig`` value, in help order."""
    own = {o.name: o for o in _options_of(TrainConfig, None)}
    nested = {"lora": LoraSpec, "patch_spec": PatchOptions}
    result: list[Option] = []
    for f in fields(TrainConfig):
        if f.name in nested:
            result += _options_of(nested[f.name], f.name, f.metadata["group"])
        elif f.name in own:
            result.append(own[f.name])
    return tuple(result)
