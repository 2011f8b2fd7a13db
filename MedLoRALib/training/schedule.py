"""What happens when: the optimizer and its learning-rate schedule, and the batch order.

Every random draw is derived from (seed, stage, epoch, step) through ``step_seed``, so a run
stopped after any step and resumed draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def step_seed(*parts: int) -> int:
    """A 63-bit seed derived from ``parts`` (all ≥ 0)."""
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


def make_optimizer(trainable: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, total_steps: int,
                   warmup_fraction: float):
    """AdamW (no decay on biases and norms) with warm-up + cosine; returns (optimizer, scheduler)."""
    trainable = list(trainable)
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_fraction))
    return optimizer, scheduler


def micro_batches(train_indices: np.ndarray, *, seed: int, stage_index: int, epoch: int, rank: int, world: int,
                  batch_size: int, grad_accum: int) -> list[list[list[int]]]:
    """One process's optimizer steps for an epoch, each a list of micro-batches of sample indices."""
    sampler = DistributedSampler(range(len(train_indices)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=step_seed(seed, stage_index) % (2 ** 31))
    sampler.set_epoch(epoch)
    order = [int(train_indices[i]) for i in sampler]
    micro = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [micro[i:i + grad_accum] for i in range(0, len(micro), grad_accum)]
