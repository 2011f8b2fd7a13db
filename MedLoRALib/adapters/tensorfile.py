"""Check that bytes are a complete safetensors file, without torch (3D Slicer imports adapters).

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length
N, N bytes of JSON mapping tensor names to ``dtype``, ``shape`` and ``data_offsets``, then the
tensor data. The checks are those ``safetensors`` itself makes before loading: the header
parses, every tensor's byte range matches its dtype and shape, and the ranges tile the data
exactly — so a truncated or padded file is refused before it reaches the store.
"""

from __future__ import annotations

import json
import math

from ..errors import AdapterError

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _tensor_bytes(name: str, entry: object) -> tuple[int, int]:
    """(begin, end) of a header entry whose dtype and shape agree with its byte range."""
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {name!r} has no dtype/shape/data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    if offsets[1] - offsets[0] != DTYPE_BYTES[dtype] * math.prod(shape):
        raise ValueError(f"tensor {name!r} ({dtype} {shape}) does not fill its {offsets[1] - offsets[0]} bytes")
    return offsets[0], offsets[1]


def check_safetensors(data: bytes, what: str) -> list[str]:
    """The tensor names of a complete safetensors file; ``AdapterError`` naming ``what`` otherwise."""
    try:
        if len(data) < 8:
            raise ValueError(f"only {len(data)} bytes")
        size = int.from_bytes(data[:8], "little")
        if size > min(MAX_HEADER_BYTES, len(data) - 8):
            raise ValueError(f"its header claims {size} bytes but the file holds {len(data) - 8} after the length")
        header = json.loads(data[8:8 + size].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        ranges = sorted(_tensor_bytes(name, entry) for name, entry in header.items() if name != "__metadata__")
        end = 0
        for begin, stop in ranges:
            if begin != end:
                raise ValueError("its tensors overlap or leave gaps")
            end = stop
        if end != len(data) - 8 - size:
            raise ValueError(f"its tensors need {end} bytes of data, the file holds {len(data) - 8 - size} "
                             "(truncated or padded)")
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise AdapterError(f"{what} is not a complete safetensors file: {exc}. The adapter is damaged "
                           "(an interrupted copy or download?): get a fresh copy.") from exc
    return [name for name in header if name != "__metadata__"]
