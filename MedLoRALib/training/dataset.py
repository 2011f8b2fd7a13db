"""A torch Dataset of nodule patches cut on the fly from volumes held in memory.

Patch cutting is numpy (``augment.cut_patch``); this wrapper only hands patches to a
DataLoader. Each volume was loaded once (``manifest.load_training_set``) and is shared by
every sample of that image; with DataLoader workers it is shared copy-on-write.
"""

from __future__ import annotations

import signal

import numpy as np
import torch
from torch.utils.data import Dataset

from ..patches import PatchSpec
from .augment import AugmentConfig, cut_patch, sample_rng
from .manifest import TrainingSet


class PatchDataset(Dataset):
    """Item ``i`` is (patch float32 tensor ``spec.shape``, label float, sample index).

    ``i`` indexes the full sample list, so a split is just a list of indices and a
    sample's augmentation depends only on (seed, epoch, i): see ``augment.sample_rng``.
    Without ``augment`` the patch is the deterministic one the scoring engine cuts.
    """

    def __init__(self, data: TrainingSet, spec: PatchSpec, augment: AugmentConfig | None = None,
                 seed: int = 0) -> None:
        self.data = data
        self.spec = spec
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before creating each epoch's DataLoader iterator (workers copy the dataset then)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        sample = self.data.samples[index]
        image = self.data.images[sample.image_key]
        rng = sample_rng(self.seed, self.epoch, index) if self.augment is not None else None
        patch = cut_patch(image, sample.centre_lps, self.spec, self.augment, rng)
        return torch.from_numpy(np.ascontiguousarray(patch)), torch.tensor(float(sample.label)), index


def ignore_sigint_in_worker(_worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: let the main process stop cleanly, not the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
