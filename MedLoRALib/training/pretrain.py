"""Pre-train a ViT on synthetic CT: the honest stand-in for a pretrained large vision model.

Large pretrained backbones cannot be downloaded here, and a randomly initialised backbone
makes LoRA vs full fine-tuning vs linear probe meaningless (there is nothing pretrained to
keep frozen). So the ``medlora_tiny`` architecture is pre-trained on a *different* task than
malignancy (any other registry ViT, e.g. ``dinov2_vits14`` from random init at a ``pixels``
size the CPU affords, can be pre-trained the same way): naming the anatomical structure at
the centre of a synthetic chest CT patch — lung parenchyma, vessel, vessel bifurcation,
airway, pleura/chest wall, or nodule. Nodules of every shape and composition (smooth,
lobulated, spiculated; solid, ground-glass, part-solid, calcified) are all just "nodule": the
pretext labels never say anything about malignancy.

Each patch is an analytic scene (``synthetic/scenes.py``) evaluated at the very sample
points ``patches.extract_patches`` uses for a randomly rotated frame, then given
correlated CT noise and the same HU window and normalisation as the classifier's input.
Single grey planes and ortho3 (three planes as RGB) are mixed, the two ways the
classifier shows patches to the ViT.

Everything is seeded: the batch drawn at step ``s`` depends only on ``(seed, s)``.
The patch code is numpy-only; torch is imported by the training functions alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..atomic import atomic_path, write_text_atomic
from ..errors import MedLoRAError
from ..patches import PatchSpec, normalise, sample_points_lps
from ..synthetic.scenes import STRUCTURES, structure_hu
from .augment import random_rotation

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_WEIGHTS = ASSETS_DIR / "medlora_tiny_synthct.safetensors"
_VAL_STREAM, _TRAIN_STREAM = 1, 2


@dataclass(frozen=True)
class PretrainConfig:
    """A pre-training run.

    Args:
        backbone: registry name of the architecture to pre-train (random init).
        pixels: patch side in px, a multiple of the backbone's ViT patch size; 0 means the
            backbone's own input size (64 for ``medlora_tiny``). The position embedding is
            built for exactly this grid, so the weights load at this size without resampling.
        steps: optimizer steps.
        batch_size: patches per step.
        lr: peak AdamW learning rate (linear warm-up, cosine decay).
        weight_decay: AdamW decay on matrices.
        warmup_fraction: share of steps with linear warm-up.
        label_smoothing: cross-entropy label smoothing.
        ortho3_fraction: share of patches shown as three orthogonal planes in RGB.
        fov_mm: patch field of view (the classifier's default crop is 50 mm).
        val_size: fixed validation patches drawn once from a separate seed stream.
        seed: the only source of randomness.
        threads: torch CPU threads.
        storage_dtype: dtype of the saved tensors (``float16`` halves the file; loading is exact).
        contrastive_weight: weight of a self-supervised term (0 disables): each step shows two
            views of every scene and an NT-Xent loss asks each view to find its partner among
            all the others — instance discrimination needs the details that tell one nodule's
            outline or texture from another's, which the structure labels alone never ask for.
            ``batch_size`` then counts scenes (two images each).
        temperature: NT-Xent temperature.
    """

    backbone: str = "medlora_tiny"
    pixels: int = 0
    steps: int = 700
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    ortho3_fraction: float = 0.25
    fov_mm: float = 50.0
    val_size: int = 600
    seed: int = 0
    threads: int = 2
    storage_dtype: str = "float16"
    contrastive_weight: float = 0.0
    temperature: float = 0.2

    def __post_init__(self) -> None:
        problems = [f"{name} must be ≥ 1, got {getattr(self, name)}"
                    for name in ("steps", "batch_size", "val_size", "threads") if int(getattr(self, name)) < 1]
        if int(self.pixels) < 0:
            problems.append(f"pixels must be ≥ 0 (0: the backbone's own size), got {self.pixels}")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            problems.append(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        if not 0.0 <= self.ortho3_fraction <= 1.0:
            problems.append(f"ortho3_fraction must be in [0, 1], got {self.ortho3_fraction}")
        if self.storage_dtype not in ("float16", "float32"):
            problems.append(f"storage_dtype must be float16 or float32, got {self.storage_dtype!r}")
        if not self.lr > 0 or not self.fov_mm > 0 or not self.temperature > 0:
            problems.append("lr, fov_mm and temperature must be positive")
        if self.contrastive_weight < 0:
            problems.append(f"contrastive_weight must be ≥ 0, got {self.contrastive_weight}")
        if problems:
            raise MedLoRAError("invalid pre-training configuration: " + "; ".join(problems))


# --- patches (numpy) -----------------------------------------------------------------------------


def synthetic_patch(rng: np.random.Generator, structure: int, spec: PatchSpec,
                    view_rng: np.random.Generator | None = None) -> np.ndarray:
    """One normalised patch (``spec.shape``) whose centre shows ``STRUCTURES[structure]``.

    ``view_rng`` (default: ``rng``) draws only the view — the sampling frame's rotation and
    the noise — so two calls with equally seeded ``rng`` and different ``view_rng`` show the
    same scene from two angles.
    """
    view = rng if view_rng is None else view_rng
    rotation = random_rotation(view, 180.0)
    points = sample_points_lps(np.zeros(3), spec, rotation[None])[0].reshape(-1, 3).astype(np.float32)
    image = structure_hu(points, structure, rng).reshape(spec.shape)
    noise = ndimage.gaussian_filter(view.normal(size=image.shape), sigma=(0, *(view.uniform(0.5, 1.1),) * 2))
    image = image + noise * (view.uniform(8.0, 45.0) / max(float(noise.std()), 1e-6))
    return normalise(image, spec)


def patch_specs(fov_mm: float, pixels: int) -> tuple[PatchSpec, PatchSpec]:
    """The grey single-plane and the ortho3 (RGB) crops the classifier feeds to its ViT."""
    return (PatchSpec(views="axial", fov_mm=fov_mm, pixels=pixels),
            PatchSpec(views="ortho3", fov_mm=fov_mm, pixels=pixels))


def synthetic_batch(seed: int, stream: int, index: int, size: int, pixels: int, fov_mm: float = 50.0,
                    ortho3_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(size, 3, P, P) float32 images and (size,) structure labels, fixed by (seed, stream, index).

    Classes are balanced by cycling through them from a random start.
    """
    rng = np.random.default_rng([int(seed), int(stream), int(index), 0x5C7])
    grey, ortho3 = patch_specs(fov_mm, pixels)
    labels = (rng.integers(len(STRUCTURES)) + np.arange(size)) % len(STRUCTURES)
    rng.shuffle(labels)
    images = np.empty((size, 3, pixels, pixels), dtype=np.float32)
    for i, label in enumerate(labels):
        if rng.random() < ortho3_fraction:
            images[i] = synthetic_patch(rng, int(label), ortho3)
        else:
            images[i] = synthetic_patch(rng, int(label), grey)  # (1, P, P) broadcast to 3 channels
    return images, labels.astype(np.int64)


def synthetic_pairs(seed: int, stream: int, index: int, size: int, pixels: int, fov_mm: float = 50.0,
                    ortho3_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(2, size, 3, P, P) images — two views of each of ``size`` scenes — and (size,) labels.

    The two views differ in rotation, noise and possibly format (grey plane vs ortho3);
    the scene itself is the same. Fixed by (seed, stream, index).
    """
    rng = np.random.default_rng([int(seed), int(stream), int(index), 0x5C8])
    grey, ortho3 = patch_specs(fov_mm, pixels)
    labels = (rng.integers(len(STRUCTURES)) + np.arange(size)) % len(STRUCTURES)
    rng.shuffle(labels)
    scene_seeds = rng.integers(2 ** 63, size=size)
    images = np.empty((2, size, 3, pixels, pixels), dtype=np.float32)
    for i, label in enumerate(labels):
        for v in range(2):
            view_rng = np.random.default_rng([int(seed), int(stream), int(index), i, v, 0x71E])
            spec = ortho3 if view_rng.random() < ortho3_fraction else grey
            images[v, i] = synthetic_patch(np.random.default_rng(int(scene_seeds[i])), int(label), spec, view_rng)
    return images, labels.astype(np.int64)


# --- training (torch) ---------------------------------------------------------------------------


def _lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    warmup = max(1, round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress)))


def pretrain_pixels(config: PretrainConfig, arch) -> int:
    """The patch side to pre-train at: whole ViT patches only, so no token is padding."""
    pixels = int(config.pixels or arch.img_size)
    if pixels < arch.patch_size or pixels % arch.patch_size:
        raise MedLoRAError(
            f"pre-training {config.backbone} at {pixels} px: the side must be a multiple of its "
            f"{arch.patch_size}-pixel ViT patch (e.g. --pixels {max(1, round(pixels / arch.patch_size)) * arch.patch_size})")
    return pixels


def _build(config: PretrainConfig):
    import timm
    import torch

    from ..models import get_backbone_config

    arch = get_backbone_config(config.backbone)  # ModelError names the choices for an unknown name
    pixels = pretrain_pixels(config, arch)
    torch.manual_seed(config.seed)
    vit = timm.create_model(arch.timm_name, pretrained=False, num_classes=0,
                            **{**arch.timm_kwargs, "img_size": pixels})
    head = torch.nn.Linear(int(vit.embed_dim), len(STRUCTURES))
    projector = None
    if config.contrastive_weight > 0:
        projector = torch.nn.Sequential(torch.nn.Linear(int(vit.embed_dim), 256), torch.nn.GELU(),
                                        torch.nn.Linear(256, 64))
    return vit, head, projector, arch, pixels


def _nt_xent(z, temperature: float):
    """SimCLR's loss: rows i and i + n of ``z`` are two views of one scene, all other rows are negatives."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(z, dim=1)
    n = len(z) // 2
    similarity = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    partners = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(similarity, partners)


def _accuracy(vit, head, images: np.ndarray, labels: np.ndarray) -> tuple[float, list[list[int]]]:
    import torch

    vit.eval()
    with torch.no_grad():
        predicted = np.concatenate([head(vit(torch.from_numpy(images[i:i + 128]))).argmax(1).numpy()
                                    for i in range(0, len(images), 128)])
    confusion = np.zeros((len(STRUCTURES),) * 2, dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    return float((predicted == labels).mean()), confusion.tolist()


def pretrain(config: PretrainConfig, out: Path = DEFAULT_WEIGHTS, *, command: str = "",
             log_every: int = 50) -> dict:
    """Pre-train, save the backbone (no head) as safetensors and a JSON record beside it.

    Returns the record (also written to ``out`` with suffix ``.json``).
    """
    import safetensors.torch
    import timm
    import torch

    from ..adapters.manifest import now_iso, sha256_file

    out = Path(out)
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    vit, head, projector, arch, pixels = _build(config)
    modules = [m for m in (vit, head, projector) if m is not None]
    parameters = [p for m in modules for p in m.parameters()]
    val_images, val_labels = synthetic_batch(config.seed, _VAL_STREAM, 0, config.val_size, pixels,
                                             config.fov_mm, config.ortho3_fraction)
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.steps, config.warmup_fraction))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    data_s = 0.0
    losses = []
    for step in range(config.steps):
        t0 = time.perf_counter()
        if projector is None:
            images, labels = synthetic_batch(config.seed, _TRAIN_STREAM, step, config.batch_size, pixels,
                                             config.fov_mm, config.ortho3_fraction)
        else:
            pairs, labels = synthetic_pairs(config.seed, _TRAIN_STREAM, step, config.batch_size, pixels,
                                            config.fov_mm, config.ortho3_fraction)
            images, labels = pairs.reshape(-1, *pairs.shape[2:]), np.concatenate([labels, labels])
        data_s += time.perf_counter() - t0
        vit.train()
        features = vit(torch.from_numpy(images))
        loss = criterion(head(features), torch.from_numpy(labels))
        if projector is not None:
            loss = loss + config.contrastive_weight * _nt_xent(projector(features), config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if not np.isfinite(losses[-1]):
            raise MedLoRAError(f"pre-training diverged at step {step + 1} (loss {losses[-1]}): lower --lr")
        if log_every and ((step + 1) % log_every == 0 or step + 1 == config.steps):
            log.info("step %d/%d: loss %.4f (mean of last %d), %.0f s", step + 1, config.steps,
                     float(np.mean(losses[-log_every:])), min(log_every, len(losses)), time.perf_counter() - started)
    dtype = getattr(torch, config.storage_dtype)
    state = {k: v.detach().to(dtype).contiguous() for k, v in vit.state_dict().items()}
    vit.load_state_dict(state)  # evaluate exactly what is shipped (float16 rounding included)
    val_accuracy, confusion = _accuracy(vit, head, val_images, val_labels)
    train_s = time.perf_counter() - started
    # One metadata key only: safetensors writes several in a random order, and the file's SHA-256
    # must not change when the same weights are written again (the record lives in the JSON).
    with atomic_path(out) as tmp:
        safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})
    record = {
        "file": out.name,
        "sha256": sha256_file(out),
        "size_bytes": out.stat().st_size,
        "backbone": config.backbone,
        "architecture": {"timm_name": arch.timm_name, **arch.timm_kwargs, "img_size": pixels},
        "parameters": int(sum(v.numel() for v in state.values())),
        "storage_dtype": config.storage_dtype,
        "pretext_task": {
            "what": "classify the structure at the centre of a synthetic chest CT patch (never malignancy)",
            "classes": list(STRUCTURES),
            "data": ("analytic synthetic CT scenes (soft-edged vessels, bifurcations, airways with companion "
                     "arteries, pleura with fat and ribs, nodules of any shape and composition, distractor vessels, "
                     "parenchyma variation, correlated noise) sampled on randomly rotated planes with "
                     "MedLoRALib.patches; single grey planes and ortho3 RGB mixed"),
            "patch": {"fov_mm": config.fov_mm, "pixels": pixels, "window_hu": list(PatchSpec().window_hu),
                      "normalisation": "unit", "ortho3_fraction": config.ortho3_fraction},
            "objective": "structure cross-entropy" + (
                f" + {config.contrastive_weight:g} × NT-Xent between two views of each scene (self-supervised)"
                if projector is not None else ""),
            "train_patches": config.steps * config.batch_size * (2 if projector is not None else 1),
            "final_train_loss": float(np.mean(losses[-min(50, len(losses)):])),
            "val_patches": config.val_size,
            "val_accuracy": val_accuracy,
            "val_confusion": confusion,
        },
        "config": asdict(config),
        "command": command,
        "seconds": round(train_s, 1),
        "data_generation_seconds": round(data_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {config.threads}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "numpy": np.__version__},
        "created": now_iso(),
        "note": ("a stand-in for a pretrained large vision model, made by MedLoRA's own script on synthetic "
                 "data; not a clinical model"),
    }
    write_text_atomic(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """Command line of ``scripts/pretrain_tiny_backbone.py``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = PretrainConfig()
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS, help="safetensors file to write")
    parser.add_argument("--backbone", default=defaults.backbone,
                        help="registry name of the ViT to pre-train from random init (e.g. dinov2_vits14)")
    parser.add_argument("--pixels", type=int, default=defaults.pixels,
                        help="patch side in px, a multiple of the ViT patch (0: the backbone's own size)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction)
    parser.add_argument("--val-size", type=int, default=defaults.val_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--log-every", type=int, default=50, help="steps between loss lines (0: none)")
    parser.add_argument("--storage-dtype", choices=("float16", "float32"), default=defaults.storage_dtype)
    parser.add_argument("--contrastive-weight", type=float, default=defaults.contrastive_weight,
                        help="weight of the self-supervised two-view NT-Xent term (0: structure labels only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = PretrainConfig(backbone=args.backbone, pixels=args.pixels, steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, warmup_fraction=args.warmup_fraction,
                                val_size=args.val_size,
                                seed=args.seed, threads=args.threads, storage_dtype=args.storage_dtype,
                                contrastive_weight=args.contrastive_weight)
        command = "python scripts/pretrain_tiny_backbone.py " + " ".join(sys.argv[1:] if argv is None else argv)
        record = pretrain(config, args.out, command=command.strip(), log_every=args.log_every)
    except MedLoRAError as exc:
        print(f"pretrain: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: record[k] for k in ("file", "sha256", "size_bytes", "seconds")}
                     | {"val_accuracy": record["pretext_task"]["val_accuracy"]}))
    return 0
