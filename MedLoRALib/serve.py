"""The engine protocol (docs/architecture.md): JSON lines in, JSON lines out.

Every request gets exactly one response line with its ``id``; a bad request (broken
JSON or UTF-8, NaN/Infinity tokens, unknown op, bad base64 or shape, unknown adapter,
a line over the size cap) is answered with ``ok: false`` and the engine carries on.
Only ``shutdown`` or the end of input stops it.

Requests are read as bytes and split on ``\\n`` only (a raw ``\\r`` inside a line is part
of it), at most ``max_request_bytes`` per line; a longer line is skipped unread and
answered with an error. A line that cannot be parsed is answered with its id when it
starts with ``{"id": <number or string>``, else with ``"id": null``.
Replies are always valid JSON: a result that would hold NaN or infinity becomes an
error reply instead.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Union

import numpy as np

from . import __version__
from .errors import MedLoRAError

if TYPE_CHECKING:  # torch loads with the engine, not with the protocol
    from .engine import ScoringEngine

log = logging.getLogger(__name__)

_DTYPES = {"float32": np.float32, "<f4": np.float32}

# The largest request a client needs: a 9-view batch of 64 nodules at 224 px, float32, in base64:
# 64·9·224·224·4 = 115,605,504 bytes → 154,140,672 base64 characters (147 MiB). 256 MiB leaves room
# for the JSON around it and for clients that send larger batches.
DEFAULT_MAX_REQUEST_BYTES = 256 * 2**20
MAX_PIXELS = 1024        # load_backbone: a ViT at more pixels per edge is no patch model (memory)
MAX_PATCH_DIMS = 8       # score: patches are (N, planes, P, P)
MAX_DIM_SIZE = 2**31 - 1
MAX_ENSEMBLE = 64        # score: adapters in one ensemble request
_ID_SCAN_BYTES = 4096    # bytes kept of an over-long line, to find its id
_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*(-?\d{1,40}|"(?:[^"\\]|\\.){0,256}"|null)\s*[,}]')
_SKIP_CHUNK = 1 << 20


class ProtocolError(MedLoRAError):
    """A request that does not follow the engine protocol."""


class NonFiniteResultError(MedLoRAError):
    """A result held NaN or infinity, which JSON cannot carry (e.g. a model overflowed)."""


@dataclass(frozen=True)
class OversizedRequest:
    """A request line longer than the cap: skipped unread beyond its first bytes."""

    head: bytes  # the first bytes, to find the id
    size: int    # the line's length in bytes (without the newline)
    limit: int

    @property
    def request_id(self):
        return leading_id(self.head)

    def error(self) -> ProtocolError:
        return ProtocolError(f"request line of {self.size} bytes is longer than the limit of {self.limit} bytes "
                             "(medlora serve --max-request-bytes); it was skipped unread. Send fewer patches "
                             "per 'score' request, or raise the limit.")


RequestLine = Union[str, bytes, OversizedRequest]


def read_requests(stream: BinaryIO, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> Iterator[bytes | OversizedRequest]:
    """Request lines from a binary stream, split on ``b"\\n"`` only, each at most ``max_bytes``.

    An over-long line is read in bounded chunks and dropped (never held whole in memory);
    it comes out as an ``OversizedRequest`` so that it is answered, and reading carries on
    with the next line.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if len(line) <= max_bytes or line.endswith(b"\n"):
            yield line
            continue
        head, size = line[:_ID_SCAN_BYTES], len(line)
        del line
        while True:
            part = stream.readline(_SKIP_CHUNK)
            size += len(part)
            if not part or part.endswith(b"\n"):
                size -= part.endswith(b"\n")
                break
        yield OversizedRequest(head=head, size=size, limit=max_bytes)


def _reject_constant(name: str):
    raise ProtocolError(f"request holds {name}, which is not JSON: numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"request holds the number {text[:40]}, which overflows a 64-bit float")
    return value


def _loads(text: str):
    """Strict JSON: NaN, Infinity and numbers that overflow to infinity are refused."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def parse_request(line: str | bytes) -> dict:
    """The request object of one line; ``ProtocolError`` for anything that is not one."""
    if isinstance(line, (bytes, bytearray)):
        try:
            line = bytes(line).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"request is not valid UTF-8 (byte 0x{line[exc.start]:02x} at offset {exc.start}); "
                                "send JSON text encoded as UTF-8") from None
    try:
        request = _loads(line)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"request is not valid JSON: {exc}") from None
    except ValueError as exc:  # an integer beyond Python's digit limit (4300 by default)
        detail = "a number has too many digits" if "digits" in str(exc) else str(exc)
        raise ProtocolError(f"request is not usable JSON: {detail}") from None
    except RecursionError:
        raise ProtocolError("request is not usable JSON: nested too deeply") from None
    if not isinstance(request, dict):
        raise ProtocolError(f"request must be a JSON object with 'id' and 'op', got a JSON {type(request).__name__}")
    return request


def leading_id(head: str | bytes):
    """The id of a request that cannot be parsed (broken, over-long), when the line starts with ``{"id": ...``."""
    if isinstance(head, str):
        head = head[:_ID_SCAN_BYTES].encode("utf-8", errors="replace")
    match = _LEADING_ID.match(head[:_ID_SCAN_BYTES])
    if match is None:
        return None
    try:
        return _loads(match.group(1).decode("utf-8"))
    except (MedLoRAError, ValueError):
        return None


def decode_patches(blob) -> np.ndarray:
    """The ``{"dtype", "shape", "data"}`` object of a score request as an array."""
    if not isinstance(blob, dict):
        raise ProtocolError('patches must be an object {"dtype": "float32", "shape": [...], "data": base64}')
    dtype = blob.get("dtype")
    dtype = _DTYPES.get(dtype) if isinstance(dtype, str) else None
    if dtype is None:
        raise ProtocolError(f"patches dtype must be 'float32', got {_short(blob.get('dtype'))}")
    shape = blob.get("shape")
    if not (isinstance(shape, list) and 0 < len(shape) <= MAX_PATCH_DIMS
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_DIM_SIZE for n in shape)):
        raise ProtocolError(f"patches shape must be a list of 1 to {MAX_PATCH_DIMS} non-negative integers below "
                            f"2**31, got {_short(shape)}")
    data = blob.get("data")
    if not isinstance(data, str):
        raise ProtocolError("patches data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"patches data is not valid base64: {exc}") from None
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise ProtocolError(f"patches data has {len(raw)} bytes, but shape {shape} of float32 needs {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _short(value, limit: int = 80) -> str:
    """A value for a message, cut short (it may be anything a client sent)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested, or an int beyond the digit limit
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "…"


def _text(params: dict, key: str, required: bool = True) -> str | None:
    value = params.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"'{key}' must be a non-empty string")
    if "\x00" in value:
        raise ProtocolError(f"'{key}' must not contain NUL characters")
    return value


def _names(params: dict, key: str) -> list[str] | None:
    """An optional list of adapter names (an ensemble); None when absent."""
    value = params.get(key)
    if value is None:
        return None
    if not (isinstance(value, list) and value and len(value) <= MAX_ENSEMBLE
            and all(isinstance(v, str) and v and "\x00" not in v for v in value)):
        raise ProtocolError(f"'{key}' must be a list of 1 to {MAX_ENSEMBLE} adapter names (non-empty strings), "
                            f"got {_short(value)}")
    return value


def _flag(params: dict, key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"'{key}' must be true or false, got {_short(value)}")
    return value


def _tta(params: dict) -> bool | int | str:
    """``tta``: true (default: each adapter's own set) or false, or a variant count or set name
    (``tta.resolve_tta``); each result's ``tta`` names the set used."""
    from .tta import TTAError, resolve_tta

    value = params.get("tta", True)
    try:
        resolve_tta(value)
    except TTAError as exc:
        raise ProtocolError(f"'tta': {exc}") from None  # says what was sent (cut short) and what may be
    return value


def first_non_finite(value, where: str = "result") -> str | None:
    """The path of the first NaN or infinite number in a JSON-like value (None when all are finite)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        items = ((f"{where}.{k}", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for path, v in items if (found := first_non_finite(v, path)) is not None), None)


def _encodable(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


class EngineServer:
    """Answers protocol requests with a ScoringEngine."""

    def __init__(self, engine: ScoringEngine, write: Callable[[str], None]) -> None:
        self.engine = engine
        self._write = write
        self.stopped = False
        self._ops = {"status": self._status, "load_backbone": self._load_backbone, "attach_adapter": self._attach,
                     "set_adapter": self._set, "detach_adapter": self._detach, "score": self._score,
                     "explain": self._explain, "shutdown": self._shutdown}

    def send(self, message: dict) -> None:
        self._write(json.dumps(message, allow_nan=False) + "\n")

    def ready(self) -> None:
        self.send({"event": "ready", "version": __version__, "device": str(self.engine.device)})

    def handle(self, line: str | bytes | OversizedRequest) -> dict:
        """The response to one request line; always encodable as strict JSON."""
        if isinstance(line, OversizedRequest):
            return self._error(line.request_id, line.error())
        request_id = None
        try:
            try:
                request = parse_request(line)
            except ProtocolError:
                request_id = leading_id(line)
                raise
            request_id = request.get("id")
            if isinstance(request_id, (dict, list)):
                request_id = None
                raise ProtocolError("'id' must be a number, a string or null")
            op = request.get("op")
            if op is None:
                raise ProtocolError(f"the request has no 'op': use one of {', '.join(self._ops)}")
            if not isinstance(op, str) or op not in self._ops:
                raise ProtocolError(f"unknown op {_short(op)}: use one of {', '.join(self._ops)}")
            response = {"id": request_id, "ok": True, "result": self._ops[op](request)}
        except MedLoRAError as exc:
            response = self._error(request_id, exc)
        except Exception as exc:  # the engine must answer and survive whatever a request triggers
            log.exception("request %s failed unexpectedly", _short(request_id))
            response = self._error(request_id, exc)
        if not _encodable(response):  # a last guard: the reply line must be strict JSON
            where = first_non_finite(response, "reply")
            response = self._error(request_id, NonFiniteResultError(
                f"the reply cannot be sent as JSON: {where} is NaN or infinite" if where else
                "the reply cannot be sent as JSON (a value of a type JSON does not know)"))
        return response

    @staticmethod
    def _error(request_id, exc: Exception) -> dict:
        if not _encodable(request_id):
            request_id = None
        return {"id": request_id, "ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}

    def run(self, lines: Iterable[RequestLine]) -> int:
        """Serve until ``shutdown`` or the end of input; returns the exit code (0)."""
        self.ready()
        for line in lines:
            if not isinstance(line, OversizedRequest) and not line.strip():
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
        if pixels is not None and (not isinstance(pixels, int) or isinstance(pixels, bool)
                                   or not 2 <= pixels <= MAX_PIXELS):
            raise ProtocolError(f"'pixels' must be a whole number of pixels from 2 to {MAX_PIXELS}, "
                                f"got {_short(pixels)}")
        return self.engine.load_backbone(_text(request, "name"), weights=_text(request, "weights", False),
                                         pixels=pixels, split_qkv=_flag(request, "split_qkv", True),
                                         allow_random_init=_flag(request, "allow_random_init", False))

    def _attach(self, request: dict) -> dict:
        manifest = self.engine.attach_adapter(_text(request, "path"), name=_text(request, "name", False),
                                              weights=_text(request, "weights", False))
        return {"name": self.engine.active, "manifest": manifest.to_dict()}

    def _set(self, request: dict) -> dict:
        return {"active": self.engine.set_adapter(_text(request, "name"))}

    def _detach(self, request: dict) -> dict:
        return {"adapters": self.engine.detach_adapter(_text(request, "name"))}

    def _score(self, request: dict) -> dict:
        tta = _tta(request)
        patches = decode_patches(request.get("patches"))
        adapters = _names(request, "adapters")
        if adapters is None:
            results = self.engine.score_patches(patches, adapter=_text(request, "adapter", False), tta=tta)
        elif "adapter" in request:
            raise ProtocolError("give either 'adapter' (one adapter) or 'adapters' (an ensemble), not both")
        else:
            results = self.engine.score_patches_ensemble(patches, adapters, tta=tta)
        where = first_non_finite(results, "results")
        if where is not None:
            index = int(re.match(r"results\[(\d+)\]", where).group(1))
            peak = float(np.max(np.abs(patches[index]))) if patches[index].size else 0.0
            raise NonFiniteResultError(
                f"scoring patch {index} gave NaN or infinity ({where}): the model overflowed on values up to "
                f"{peak:.3g}. Patches must be cut and normalised with the adapter's patch_spec; these are far "
                "outside that range.")
        return {"results": results}

    def _explain(self, request: dict) -> dict:
        method = _text(request, "method", False) or "rollout"
        if method not in ("rollout", "gradxinput"):
            raise ProtocolError(f"'method' must be 'rollout' or 'gradxinput', got {method!r}")
        patches = decode_patches(request.get("patches"))
        maps, cell_px = self.engine.explain_patches(patches, method=method, adapter=_text(request, "adapter", False))
        if not np.isfinite(maps).all():  # base64 would carry NaN silently past the strict-JSON check
            raise NonFiniteResultError(f"the {method} map is NaN or infinite: the model overflowed on these patches. "
                                       "Cut and normalise them with the adapter's patch_spec.")
        data = base64.b64encode(np.ascontiguousarray(maps, dtype=np.float32).tobytes()).decode("ascii")
        return {"method": method, "cell_px": cell_px,
                "maps": {"dtype": "float32", "shape": list(maps.shape), "data": data}}

    def _shutdown(self, request: dict) -> dict:
        self.stopped = True
        return {}
