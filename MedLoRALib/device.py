"""The one place the compute device is chosen: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import os

import torch

from .errors import ModelError

ENV_VAR = "MEDLORA_DEVICE"


def _available(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    if device.type == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return False


def choose_device(preferred: str | None = None) -> torch.device:
    """The device to run on.

    ``preferred`` ("cuda", "cuda:1", "mps", "cpu"; None or "auto" = automatic) wins,
    then the ``MEDLORA_DEVICE`` environment variable, then CUDA → MPS → CPU. Asking for
    a device that is not there is an error, not a silent fallback.
    """
    request = preferred if preferred not in (None, "", "auto") else os.environ.get(ENV_VAR, "").strip()
    if request and request != "auto":
        try:
            device = torch.device(request)
        except RuntimeError as exc:
            raise ModelError(f"unknown device {request!r}: use cpu, cuda, cuda:N, mps or auto") from exc
        if not _available(device):
            origin = f"{ENV_VAR}={request}" if preferred in (None, "", "auto") else f"device {request!r}"
            raise ModelError(f"{origin} was requested but is not available on this machine; "
                             "use --device cpu or auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _available(torch.device("mps")):
        return torch.device("mps")
    return torch.device("cpu")
