"""Peak memory of one job: the accelerator's peak allocation, or the process's peak resident size.

On the CPU the kernel's high-water mark (``VmHWM``) is reset before the job where Linux allows it
(``/proc/self/clear_refs``), so each job is measured on its own although one process runs many;
the cohort's volumes loaded before the first job are in the resident size, so the increase over
the start is reported as well. Where the mark cannot be reset the value says so (``resettable``).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_MiB = 1024.0 * 1024.0


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError):
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.record`` (MiB figures)."""

    def __init__(self, device) -> None:
        self.device = device
        self.record: dict = {}

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / _MiB
        else:
            self._resettable = _reset_cpu_peak()
            self._start = _status_mib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            import torch

            peak = torch.cuda.max_memory_allocated(self.device) / _MiB
            self.record = {"kind": "cuda max allocated", "peak_mib": round(peak, 1),
                           "increase_mib": round(peak - self._start, 1), "resettable": True}
            return
        peak = _status_mib("VmHWM") if self._resettable else None
        if peak is None:  # not Linux, or not allowed: the process's lifetime peak
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = maxrss / _MiB if sys.platform == "darwin" else maxrss / 1024.0
        start = self._start if self._start is not None else float("nan")
        self.record = {"kind": "process peak RSS", "peak_mib": round(peak, 1),
                       "increase_mib": round(peak - start, 1) if self._resettable else None,
                       "resettable": bool(self._resettable)}
