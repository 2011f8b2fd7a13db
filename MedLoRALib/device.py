"""The one place the compute device and the numeric precision are chosen.

Device: CUDA, then Apple MPS, then CPU. Precision: bf16 autocast on CUDA, fp32 elsewhere
unless asked otherwise (``choose_precision``).
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from contextlib import nullcontext

import torch
from torch import nn

from .errors import ModelError

ENV_VAR = "MEDLORA_DEVICE"
log = logging.getLogger(__name__)


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


# --- numeric precision -----------------------------------------------------------------
PRECISIONS = ("fp32", "bf16", "int8")
PRECISION_ENV_VAR = "MEDLORA_PRECISION"


def cpu_features() -> dict:
    """What this CPU offers the fast paths: AVX2/AVX-512, native bf16 (AVX512_BF16, AMX), int8 kernels."""
    cpu = getattr(torch, "cpu", None)

    def probe(name: str) -> bool:
        fn = getattr(cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except RuntimeError:
            return False

    engines = set(getattr(torch.backends.quantized, "supported_engines", ()))
    return {
        "avx2": probe("_is_avx2_supported"),
        "avx512": probe("_is_avx512_supported"),
        "avx512_bf16": probe("_is_avx512_bf16_supported"),
        "amx": probe("_is_amx_tile_supported"),
        "int8_engine": next((e for e in ("x86", "fbgemm") if e in engines), None),
    }


def cpu_peak_gflops(threads: int) -> dict:
    """A rough fp32 FMA peak for ``threads`` cores (2 FMA units × vector lanes × 2 × GHz).

    The clock is the one /proc/cpuinfo reports (base, not turbo); bf16 is listed only as
    a multiple where the CPU has native bf16 (AMX tiles: ~16× fp32 per core in Intel's
    figures; AVX512_BF16: 2×), otherwise bf16 is emulated and slower than fp32.
    """
    features = cpu_features()
    lanes = 16 if features["avx512"] else 8 if features["avx2"] else 4
    ghz = 0.0
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            mhz = [float(line.split(":")[1]) for line in info if line.lower().startswith("cpu mhz")]
        ghz = (max(mhz) / 1000.0) if mhz else 0.0
    except OSError:
        pass
    fp32 = 2 * lanes * 2 * ghz * threads
    bf16 = 16 * fp32 if features["amx"] else 2 * fp32 if features["avx512_bf16"] else None
    return {"ghz": round(ghz, 2), "fp32_lanes": lanes, "fp32_gflops": round(fp32, 1),
            "bf16_gflops": None if bf16 is None else round(bf16, 1), "features": features}


def choose_precision(device: torch.device, preferred: str | None = None) -> str:
    """The numeric precision of scoring on ``device``: ``fp32``, ``bf16`` or ``int8``.

    ``preferred`` (None or "auto" = automatic) wins, then ``MEDLORA_PRECISION``. Automatic
    is bf16 autocast on CUDA and fp32 elsewhere: on the CPU fp32 keeps scores bit-identical
    to the trained model, int8 (dynamic quantisation of the backbone's linear layers, LoRA
    merged first) is the measured faster option (docs/perf.md) and bf16 pays off only with
    native bf16 units (AMX/AVX512_BF16; emulated, it was 10× slower than fp32). Asking
    for a precision the device cannot run is an error, not a silent fallback.
    """
    request = preferred if preferred not in (None, "", "auto") else os.environ.get(PRECISION_ENV_VAR, "").strip()
    origin = f"{PRECISION_ENV_VAR}={request}" if preferred in (None, "", "auto") else f"precision {request!r}"
    if not request or request == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if request not in PRECISIONS:
        raise ModelError(f"unknown {origin}: use {', '.join(PRECISIONS)} or auto")
    if request == "int8":
        if device.type != "cpu":
            raise ModelError(f"{origin} runs on the CPU only (dynamic int8 quantisation); use bf16 or fp32 "
                             f"on {device.type}")
        if cpu_features()["int8_engine"] is None:
            raise ModelError(f"{origin} was requested, but this torch build has no int8 CPU kernels "
                             "(quantized engine x86/fbgemm); use --precision fp32")
    if request == "bf16" and device.type == "mps":
        raise ModelError(f"{origin} is not supported on mps; use fp32")
    if request == "bf16" and device.type == "cpu":
        features = cpu_features()
        if not (features["amx"] or features["avx512_bf16"]):
            log.warning("%s: this CPU has no native bf16 (AMX/AVX512_BF16), so bf16 is emulated and much "
                        "slower than fp32 (10x in docs/perf.md); fp32 or int8 are faster here", origin)
    return request


def precision_context(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (bf16 only; fp32 and int8 run as they are)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def prepare_for_precision(model: nn.Module, precision: str, lora_name: str | None) -> nn.Module:
    """The model to run at ``precision``: ``model`` itself, or for int8 a quantised copy.

    The int8 copy is the classifier with the LoRA adapter ``lora_name`` merged into its
    base weights (other adapters dropped; None: LoRA removed, as for a linear probe) and
    the backbone's linear layers dynamically quantised to int8 (weights per tensor,
    activations per batch). The head and norms stay fp32. ``model`` is not modified.
    """
    if precision != "int8":
        return model
    from .models.classifier import base_vit

    engine = cpu_features()["int8_engine"]
    if engine is not None and torch.backends.quantized.engine != engine:
        torch.backends.quantized.engine = engine
    fast = copy.deepcopy(model).cpu().eval()
    _strip_lora(fast, lora_name)
    vit = base_vit(fast.backbone)
    fast.backbone = vit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices; the API is still the one that runs
        torch.ao.quantization.quantize_dynamic(vit, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return fast


def _strip_lora(model: nn.Module, lora_name: str | None) -> None:
    """Replace every peft LoRA layer in ``model`` by its base layer, ``lora_name`` merged in first."""
    layers = [(name, module) for name, module in model.named_modules()
              if hasattr(module, "get_base_layer") and hasattr(module, "lora_A")]
    for name, module in layers:
        if lora_name is not None and lora_name in module.lora_A:
            module.merge(adapter_names=[lora_name])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
