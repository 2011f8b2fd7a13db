"""What an experiment runs: the arms, the size presets (``--config``) and every option, checked.

No torch: building a ``TrainConfig`` for a job needs only the training configuration module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from ..lora_spec import LoraSpec
from ..patches import PatchSpec

# arm -> (trainer mode, LoRA targets); LoRA keeps MED-PEFT's rank 8, alpha 32, dropout 0.1
ARMS: dict[str, tuple[str, str | None]] = {
    "lora_qv": ("lora", "qv"),  # q and v of a split qkv (MeLo, MED-PEFT)
    "lora_all": ("lora", "all"),  # qkv, proj, fc1, fc2
    "full": ("full", None),
    "linear": ("linear", None),  # head only
}


@dataclass(frozen=True)
class Preset:
    """A backbone and the training budget that suits it (each may be overridden by an option)."""

    backbone: str
    epochs: int
    batch_size: int
    pixels: int
    patience: int
    description: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset("medlora_tiny_synthct", epochs=10, batch_size=16, pixels=64, patience=5,
                   description="MedLoRA's tiny ViT pre-trained on synthetic CT (shipped): a quick CPU check of the "
                               "pipeline, not the paper's model"),
    "vits14": Preset("dinov2_vits14", epochs=20, batch_size=16, pixels=112, patience=5,
                     description="DINOv2 ViT-S/14, the project's default backbone (weights from the hub or --weights)"),
    "vitb14": Preset("dinov2_vitb14", epochs=20, batch_size=16, pixels=112, patience=5,
                     description="DINOv2 ViT-B/14 (MED-PEFT's size class; weights from the hub or --weights)"),
}
DEFAULT_PRESET = "vits14"


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment. ``None`` for epochs, batch_size and pixels means: the preset's value."""

    manifest: Path
    out: Path
    folds: int = 5
    arms: tuple[str, ...] = tuple(ARMS)
    preset: str = DEFAULT_PRESET
    epochs: int | None = None
    batch_size: int | None = None
    pixels: int | None = None
    views: str = "multiview9"
    seed: int = 0
    weights: Path | None = None
    random_init: bool = False
    device: str | None = None
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    n_boot: int = 2000
    keep_adapters: bool = False  # write each fold × arm model as an adapter folder (the trainer's output)
    poll_s: float = 2.0  # how often rank 0 looks for the other processes' results

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifest", Path(self.manifest))
        object.__setattr__(self, "out", Path(self.out))
        if self.weights is not None:
            object.__setattr__(self, "weights", Path(self.weights))
        object.__setattr__(self, "arms", tuple(self.arms))
        problems = []
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            problems.append(f"unknown arm(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(ARMS)}")
        if len(set(self.arms)) != len(self.arms):
            problems.append(f"--arms names an arm twice: {','.join(self.arms)}")
        if self.preset not in PRESETS:
            problems.append(f"unknown --config {self.preset!r}: choose from {', '.join(PRESETS)}")
        if int(self.folds) < 2:
            problems.append(f"--folds must be at least 2, got {self.folds}")
        for name in ("epochs", "batch_size", "pixels", "threads"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if int(self.n_boot) < 100:
            problems.append(f"--bootstrap must be at least 100 resamples, got {self.n_boot}")
        if self.resume and self.overwrite:
            problems.append("--resume continues an experiment and --overwrite discards it: give one of them")
        if problems:
            raise DatasetError("invalid experiment settings: " + "; ".join(problems))

    @property
    def preset_values(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def backbone(self) -> str:
        return self.preset_values.backbone

    def budget(self) -> dict:
        """Epochs, batch size and patch pixels after the preset and the overrides."""
        p = self.preset_values
        return {"epochs": int(self.epochs or p.epochs), "batch_size": int(self.batch_size or p.batch_size),
                "pixels": int(self.pixels or p.pixels), "patience": p.patience}

    def patch_spec(self) -> PatchSpec:
        return PatchSpec(views=self.views, fov_mm=50.0, pixels=self.budget()["pixels"])

    def train_config(self, arm: str, out: Path):
        """The ``TrainConfig`` of ``arm`` writing its adapter to ``out`` (checkpoint beside it)."""
        from ..training.config import TrainConfig

        mode, targets = ARMS[arm]
        budget = self.budget()
        return TrainConfig(manifest=self.manifest.resolve(), out=out, name=out.parent.name, backbone=self.backbone,
                           weights=self.weights, random_init=self.random_init, mode=mode,
                           lora=LoraSpec(targets=targets) if targets else LoraSpec(), patch_spec=self.patch_spec(),
                           epochs=budget["epochs"], batch_size=budget["batch_size"], patience=budget["patience"],
                           seed=self.seed, device=self.device, threads=self.threads, progress_every=10 ** 6,
                           overwrite=True)

    def identity(self) -> dict:
        """What a resumed experiment must share with the first run (arms may be added later)."""
        return {"manifest": str(self.manifest.resolve()), "folds": int(self.folds), "preset": self.preset,
                "backbone": self.backbone, **self.budget(), "views": self.views, "seed": int(self.seed),
                "weights": str(self.weights.resolve()) if self.weights else None, "random_init": self.random_init}
