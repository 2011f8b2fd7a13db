"""The processes of one training: the ``torchrun`` job a process belongs to, and stopping.

``DistContext`` also carries the few collective operations the loop needs, so the loop reads
the same with one process or many.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all processes."""
        if not self.active:
            return value
        t = torch.tensor([value], device=self._collective_device(), dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def gather(self, items: list) -> list:
        """Every process's ``items``, concatenated in rank order."""
        if not self.active:
            return items
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, items)
        return [item for part in gathered for item in part]


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
