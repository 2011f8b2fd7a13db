"""Resumable training state in safetensors + JSON (nothing pickled).

A checkpoint directory holds ``state.json`` (counters, history, scheduler, RNG states,
the configuration it belongs to) and the tensors it names, ``state-<n>.safetensors``
(trainable weights now and at the best epoch, optimizer moments, torch RNG). The tensor
file is written first under a new name and ``state.json`` is replaced atomically after
it, so a run killed at any moment leaves either the old or the new checkpoint, whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import sha256_file, temp_path, write_json_atomic
from ..errors import MedLoRAError
from ..outputs import CHECKPOINT, MARKER_NAME, write_marker
from .progress import jsonable

FORMAT = "medlora-train-checkpoint"
VERSION = 1
STATE_FILE = "state.json"


class CheckpointError(MedLoRAError):
    """A checkpoint is missing, damaged, or belongs to another training configuration."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the JSON part and its tensors (on CPU)."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    directory: Path

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors saved under ``prefix/`` with the prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + "/")}


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python, numpy and torch global RNG states as (JSON part, tensor part)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    meta = {"python": [version, list(state), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return meta, tensors


def set_rng_state(meta: dict, checkpoint: Checkpoint) -> None:
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(checkpoint.tensors["rng/torch"])
    cuda = checkpoint.group("rng/cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda[str(i)] for i in range(len(cuda))])


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def restore_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    meta = checkpoint.meta["optimizer"]
    state: dict[int, dict] = {}
    for name, value in checkpoint.group("optim").items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(directory: str | Path, *, weights: dict[str, torch.Tensor],
                    best_weights: dict[str, torch.Tensor] | None, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, progress: dict,
                    config: dict) -> Path:
    """Write a complete, resumable checkpoint; return its ``state.json`` path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / MARKER_NAME).is_file():
        write_marker(directory, CHECKPOINT)
    rng_meta, rng_tensors = rng_state()
    optim_meta, optim_tensors = _optimizer_parts(optimizer)
    tensors = {f"model/{k}": v for k, v in weights.items()}
    if best_weights is not None:
        tensors.update({f"best/{k}": v for k, v in best_weights.items()})
    tensors.update(optim_tensors)
    tensors.update(rng_tensors)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    previous = _read_meta(directory)
    generation = int(previous.get("generation", 0)) + 1 if previous else 1
    tensor_name = f"state-{generation}.safetensors"
    tmp = temp_path(directory / tensor_name)
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, directory / tensor_name)
    meta = {"format": FORMAT, "version": VERSION, "generation": generation, "tensors": tensor_name,
            "sha256": digest, "config": config, "progress": progress, "optimizer": optim_meta,
            "scheduler": scheduler.state_dict(), "rng": rng_meta}
    write_json_atomic(directory / STATE_FILE, jsonable(meta))
    for old in directory.glob("state-*.safetensors"):
        if old.name != tensor_name:
            old.unlink(missing_ok=True)
    return directory / STATE_FILE


def _read_meta(directory: Path) -> dict:
    path = directory / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({exc}); delete {directory} to start over") from exc


def has_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / STATE_FILE).is_file()


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``, verifying its tensor file."""
    directory = Path(directory)
    meta = _read_meta(directory)
    if not meta:
        raise CheckpointError(f"no checkpoint to resume from in {directory} (expected {STATE_FILE}); "
                           "run without --resume to start a new training")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{directory / STATE_FILE} is not a MedLoRA training checkpoint of version {VERSION}")
    tensor_path = directory / meta["tensors"]
    if not tensor_path.is_file() or sha256_file(tensor_path) != meta["sha256"]:
        raise CheckpointError(f"checkpoint tensors {tensor_path} are missing or do not match state.json; "
                           f"delete {directory} to start over")
    return Checkpoint(meta=meta, tensors=load_file(str(tensor_path)), directory=directory)


# --- what a checkpoint belongs to ---------------------------------------------------------------


def data_fingerprint(samples) -> str:
    """SHA-256 over every sample's image, centre, label and patient: a resumed run must see the same data."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([s.image_key, list(s.centre_lps), s.label, s.patient_id]).encode())
    return digest.hexdigest()


def frozen_fingerprint(model: torch.nn.Module, trainable: dict) -> str:
    """SHA-256 over the frozen (not trained) tensors: a resumed run must start from the same backbone."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name not in trainable:
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_identity(saved: dict, current: dict, directory: Path) -> None:
    """Refuse to resume when the settings, data or frozen weights differ from the stopped run's."""
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
