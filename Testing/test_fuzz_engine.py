"""Property-based fuzzing of the engine protocol (issue 11): random JSON, random bytes, huge and non-finite numbers.

Whatever arrives, the engine answers with one strict-JSON reply whose error (if any) is a
MedLoRAError (a generic exception type would mean an unforeseen traceback inside), within a
time box, and answers ``status`` afterwards. Examples are bounded so that this runs in CI.
"""

from __future__ import annotations

import base64
import io
import json
import math
import signal
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from helpers import tree_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MedLoRALib import errors
from MedLoRALib.engine import ScoringEngine
from MedLoRALib.patches import PatchSpec
from MedLoRALib.serve import EngineServer, read_requests

torch.set_num_threads(1)
SPEC = PatchSpec(views="ortho3", pixels=32)
TIME_BOX_S = 10.0  # one request; the slowest real one here (a 3-patch TTA score) takes well under a second
FUZZ = settings(max_examples=100, deadline=15_000, database=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def time_box(seconds: float = TIME_BOX_S):
    """Interrupt a hung request (SIGALRM on POSIX) instead of hanging the test run; else just time it."""
    def expire(signum, frame):
        raise TimeoutError(f"request still running after {seconds:g} s: the engine hangs")
    armed = hasattr(signal, "setitimer")
    if armed:
        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < seconds, "request exceeded its time box"


def _error_types() -> set[str]:
    found, todo = set(), [errors.MedLoRAError]
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return found


@pytest.fixture(scope="module")
def adapter_path(tiny_adapter):
    return tiny_adapter("site-a", SPEC, scale=0.0)  # untrained: as build_model leaves it


@pytest.fixture(scope="module")
def server(engine_server, adapter_path):
    return engine_server


def _strict(line: str):
    def refuse(name):
        raise AssertionError(f"reply holds {name}: {line[:200]}")
    return json.loads(line, parse_constant=refuse)


def _check_reply(server, line, known_types: set[str]) -> dict:
    """One request: a strict-JSON reply in the time box, errors only of MedLoRA's own types."""
    with time_box():
        reply = server.handle(line)
    text = json.dumps(reply, allow_nan=False)
    assert "\n" not in text
    assert set(reply) in ({"id", "ok", "result"}, {"id", "ok", "error"})
    if not reply["ok"]:
        assert reply["error"]["type"] in known_types, f"unforeseen failure: {reply['error']}"
    server.stopped = False  # a fuzzed 'shutdown' is a valid request; keep serving for the next example
    return reply


def _still_alive(server) -> None:
    status = server.handle('{"id": "alive?", "op": "status"}')
    assert status["ok"] and status["id"] == "alive?"


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------
SPECIAL = [0.0, -0.0, 1.0, 1e-45, 65504.0, 1e25, -1e25, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan]
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**20, max_value=10**400)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(SPECIAL) | st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def patch_cases(draw) -> tuple[dict, bool]:
    """(float32 patches, 0-3 of them holding one extreme value and sometimes a broken field; whether they must score)."""
    count = draw(st.integers(0, 3))
    array = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random((count, 3, 32, 32), dtype=np.float32)
    value = draw(st.sampled_from(SPECIAL))
    if count:
        array.flat[draw(st.integers(0, array.size - 1))] = np.float32(value)
    blob = {"dtype": "float32", "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}
    broken = draw(st.sampled_from([None, None, "dtype", "shape", "data"]))
    if broken:
        blob[broken] = draw(json_values)
    return blob, broken is None and abs(value) <= 65504.0


patch_blobs = patch_cases().map(lambda case: case[0])
names = st.sampled_from(["site-a", "medlora_tiny", "no_such_vit", "", "x" * 300]) | st.text(max_size=12)
requests = st.fixed_dictionaries(
    {"op": st.sampled_from(["status", "load_backbone", "attach_adapter", "set_adapter", "detach_adapter", "score",
                            "shutdown", "explode"]) | json_values},
    optional={"id": scalars | json_values, "name": names | json_values, "path": st.just("ADAPTER") | names,
              "pixels": st.integers(-5, 2000) | st.integers() | json_values, "patches": patch_blobs | json_values,
              "tta": st.booleans() | json_values, "adapter": names, "allow_random_init": st.booleans() | json_values,
              "split_qkv": st.booleans() | json_values})


def _encode(request: dict, adapter_path) -> str:
    if request.get("path") == "ADAPTER":
        request = {**request, "path": str(adapter_path)}
    return json.dumps(request, allow_nan=True)  # NaN/Infinity tokens included, as a careless client writes them


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------
@FUZZ
@given(request=requests)
def test_fuzzed_requests_get_a_reply_and_the_engine_lives(server, adapter_path, request):
    _check_reply(server, _encode(request, adapter_path), _error_types())
    _still_alive(server)


@FUZZ
@given(value=json_values)
def test_any_json_value_gets_a_reply(server, value):
    reply = _check_reply(server, json.dumps(value, allow_nan=True), _error_types())
    assert reply["ok"] is False or (isinstance(value, dict) and value.get("op") == "status")
    _still_alive(server)


@FUZZ
@given(data=st.binary(max_size=300) | st.builds(lambda a, b: a + b, st.just(b'{"id": 7, "op": "status"'),
                                                 st.binary(max_size=40)))
def test_random_bytes_get_a_reply(server, data):
    _check_reply(server, data, _error_types())
    _still_alive(server)


pieces = (st.binary(max_size=60) | st.sampled_from([b'{"id": 1, "op": "status"}', b"\r", b" ", b'"', b"{", b"\xff"])
          | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()))


@FUZZ
@given(lines=st.lists(pieces.map(lambda b: b.replace(b"\n", b"")) | st.just(b"q" * 300), max_size=8),
       crlf=st.booleans())
def test_random_streams_get_one_reply_per_line(server, adapter_path, lines, crlf):
    """Through the real reader: replies in order, one per non-blank line (over-long lines included)."""
    before = tree_digest(adapter_path, server.store)
    limit = 256
    data = (b"\r\n" if crlf else b"\n").join(lines)
    written: list[str] = []
    serving = EngineServer(server.engine, written.append)
    with time_box():
        assert serving.run(read_requests(io.BytesIO(data), max_bytes=limit)) == 0
    replies = [_strict(line) for line in written]
    assert replies[0]["event"] == "ready"
    expected = [piece for piece in data.split(b"\n") if len(piece) > limit or piece.strip()]
    answered = replies[1:]
    stopped = bool(answered) and answered[-1].get("ok") and answered[-1].get("result") == {} and serving.stopped
    assert len(answered) == len(expected) or stopped
    for piece, reply in zip(expected, answered):
        assert set(reply) in ({"id", "ok", "result"}, {"id", "ok", "error"})
        if len(piece) > limit:
            assert "longer than the limit" in reply["error"]["message"]
    assert tree_digest(adapter_path, server.store) == before
    _still_alive(server)


@pytest.fixture(scope="module")
def scoring_server(adapter_path):
    server = EngineServer(ScoringEngine(device="cpu"), lambda _: None)
    assert server.handle(json.dumps({"id": 0, "op": "attach_adapter", "path": str(adapter_path)}))["ok"]
    return server


@FUZZ
@given(case=patch_cases(), tta=st.booleans())
def test_fuzzed_patches_reach_the_model(scoring_server, case, tta):
    """Extreme values in real patches: sane ones score with finite results, the rest get an error reply."""
    blob, must_score = case
    reply = _check_reply(scoring_server, json.dumps({"id": 1, "op": "score", "patches": blob, "tta": tta},
                                                    allow_nan=True), _error_types())
    if must_score:
        assert reply["ok"], reply
    if reply["ok"]:
        results = reply["result"]["results"]
        assert len(results) == blob["shape"][0]
        assert all(0.0 <= r["probability"] <= 1.0 for r in results)
    else:
        assert reply["error"]["type"] in {"ProtocolError", "PatchError", "NonFiniteResultError"}
    _still_alive(scoring_server)
