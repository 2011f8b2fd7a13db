"""The engine protocol (docs/architecture.md): JSON lines in, JSON lines out.

Every request gets exactly one response line with its ``id``; a bad request (broken
JSON, unknown op, bad base64 or shape, unknown adapter) is answered with
``ok: false`` and the engine carries on. Only ``shutdown`` or the end of input stops it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable, Iterable

import numpy as np

from . import __version__
from .engine import ScoringEngine
from .errors import MedLoRAError

log = logging.getLogger(__name__)

_DTYPES = {"float32": np.float32, "<f4": np.float32}


class ProtocolError(MedLoRAError):
    """A request that does not follow the engine protocol."""


def decode_patches(blob) -> np.ndarray:
    """The ``{"dtype", "shape", "data"}`` object of a score request as an array."""
    if not isinstance(blob, dict):
        raise ProtocolError('patches must be an object {"dtype": "float32", "shape": [...], "data": base64}')
    dtype = _DTYPES.get(blob.get("dtype"))
    if dtype is None:
        raise ProtocolError(f"patches dtype must be 'float32', got {blob.get('dtype')!r}")
    shape = blob.get("shape")
    if not (isinstance(shape, list) and shape and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                      for n in shape)):
        raise ProtocolError(f"patches shape must be a list of non-negative integers, got {shape!r}")
    data = blob.get("data")
    if not isinstance(data, str):
        raise ProtocolError("patches data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"patches data is not valid base64: {exc}") from exc
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise ProtocolError(f"patches data has {len(raw)} bytes, but shape {shape} of float32 needs {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _text(params: dict, key: str, required: bool = True) -> str | None:
    value = params.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"'{key}' must be a non-empty string")
    return value


class EngineServer:
    """Answers protocol requests with a ScoringEngine."""

    def __init__(self, engine: ScoringEngine, write: Callable[[str], None]) -> None:
        self.engine = engine
        self._write = write
        self.stopped = False
        self._ops = {"status": self._status, "load_backbone": self._load_backbone, "attach_adapter": self._attach, "set_adapter": self._set,
                     "detach_adapter": self._detach, "score": self._score, "shutdown": self._shutdown}

    def send(self, message: dict) -> None:
        self._write(json.dumps(message, allow_nan=False) + "\n")

    def ready(self) -> None:
        self.send({"event": "ready", "version": __version__, "device": str(self.engine.device)})

    def handle(self, line: str) -> dict:
        """The response to one request line."""
        request_id = None
        try:
            try:
                request = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProtocolError(f"request is not valid JSON: {exc}") from exc
            if not isinstance(request, dict):
                raise ProtocolError("request must be a JSON object with 'id' and 'op'")
            request_id = request.get("id")
            op = request.get("op")
            if op not in self._ops:
                raise ProtocolError(f"unknown op {op!r}: use one of {', '.join(self._ops)}")
            return {"id": request_id, "ok": True, "result": self._ops[op](request)}
        except MedLoRAError as exc:
            return self._error(request_id, exc)
        except Exception as exc:  # the engine must answer and survive whatever a request triggers
            log.exception("request %r failed unexpectedly", request_id)
            return self._error(request_id, exc)

    @staticmethod
    def _error(request_id, exc: Exception) -> dict:
        return {"id": request_id, "ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}

    def run(self, lines: Iterable[str]) -> int:
        """Serve until ``shutdown`` or the end of input; returns the exit code (0)."""
        self.ready()
        for line in lines:
            if not line.strip():
                continue
            self.send(self.handle(line))
            if self.stopped:
                break
        return 0

    # --- operations ---------------------------------------------------------------------
    def _status(self, request: dict) -> dict:
        return self.engine.status()

    def _load_backbone(self, request: dict) -> dict:
        pixels = request.get("pixels")
        if pixels is not None and (not isinstance(pixels, int) or pixels < 2):
            raise ProtocolError(f"'pixels' must be a whole number of pixels, got {pixels!r}")
        return self.engine.load_backbone(_text(request, "name"), weights=_text(request, "weights", False),
                                         pixels=pixels, split_qkv=bool(request.get("split_qkv", True)),
                                         allow_random_init=bool(request.get("allow_random_init", False)))

    def _attach(self, request: dict) -> dict:
        manifest = self.engine.attach_adapter(_text(request, "path"), name=_text(request, "name", False),
                                              weights=_text(request, "weights", False))
        return {"name": self.engine.active, "manifest": manifest.to_dict()}

    def _set(self, request: dict) -> dict:
        return {"active": self.engine.set_adapter(_text(request, "name"))}

    def _detach(self, request: dict) -> dict:
        return {"adapters": self.engine.detach_adapter(_text(request, "name"))}

    def _score(self, request: dict) -> dict:
        tta = request.get("tta", True)
        if not isinstance(tta, bool):
            raise ProtocolError(f"'tta' must be true or false, got {tta!r}")
        patches = decode_patches(request.get("patches"))
        results = self.engine.score_patches(patches, adapter=_text(request, "adapter", False), tta=tta)
        return {"results": results}

    def _shutdown(self, request: dict) -> dict:
        self.stopped = True
        return {}
