"""Bad input to the scoring engine (issue 11, items 5-7): every request gets an error reply, the engine lives.

Each case checks the reply's error type and key words, that the reply is strict JSON (no NaN),
that the engine then answers ``status``, and that the adapter and store files are unchanged.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from helpers import tree_digest

from MedLoRALib.patches import PatchSpec
from MedLoRALib.serve import DEFAULT_MAX_REQUEST_BYTES, EngineServer, OversizedRequest, read_requests

torch.set_num_threads(1)
SPEC = PatchSpec(views="ortho3", pixels=32)
SHAPE = (1, 3, 32, 32)


def _blob(array: np.ndarray, dtype: str = "float32") -> dict:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return {"dtype": dtype, "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def _patches(value: float, count: int = 1) -> dict:
    """Random patches in [0, 1) with one voxel set to ``value``."""
    array = np.random.default_rng(0).random((count, *SHAPE[1:]), dtype=np.float32)
    array[0, 1, 16, 16] = value
    return _blob(array)


def _strict(line: str):
    """Parse as strict JSON: NaN/Infinity in a reply is a protocol violation."""
    def refuse(name):
        raise AssertionError(f"reply holds {name}: {line[:200]}")
    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def adapter_path(tiny_adapter):
    return tiny_adapter("site-a", SPEC, scale=0.0)  # untrained: as build_model leaves it


@pytest.fixture(scope="module")
def server(engine_server, adapter_path):
    assert engine_server.handle(json.dumps({"id": 0, "op": "attach_adapter", "path": str(adapter_path)}))["ok"]
    return engine_server


def _ask(server, line) -> dict:
    reply = server.handle(line)
    _strict(json.dumps(reply))  # what send() writes must be strict JSON
    return reply


HUGE_INT = "9" * 5000
BAD_REQUESTS = [
    # (case id, request line, id in the reply, error type, key words)
    ("nan-id", '{"id": NaN, "op": "status"}', None, "ProtocolError", ["NaN", "not JSON"]),
    ("infinity-param", '{"id": 1, "op": "status", "x": -Infinity}', 1, "ProtocolError", ["-Infinity"]),
    ("float-overflow-id", '{"id": 1e400, "op": "status"}', None, "ProtocolError", ["1e400", "overflows"]),
    ("huge-int", '{"id": 2, "op": "status", "n": ' + HUGE_INT + "}", 2, "ProtocolError", ["digits"]),
    ("huge-int-id", json.dumps({"id": 10**300, "op": "nope"}), 10**300, "ProtocolError", ["unknown op"]),
    ("container-id", '{"id": [1], "op": "status"}', None, "ProtocolError", ["'id' must be"]),
    ("broken-json", "{broken", None, "ProtocolError", ["not valid JSON"]),
    ("json-array", "[1, 2]", None, "ProtocolError", ["JSON object", "list"]),
    ("json-string", '"status"', None, "ProtocolError", ["JSON object", "str"]),
    ("json-null", "null", None, "ProtocolError", ["JSON object"]),
    ("deep-nesting", "[" * 100_000 + "]" * 100_000, None, "ProtocolError", ["nested too deeply"]),
    ("bad-utf8", b'{"id": 3, "op": "status", "x": "\xff\xfe"}', 3, "ProtocolError", ["UTF-8", "0xff"]),
    ("raw-cr-in-string", b'{"id": 4, "op": "sta\rtus"}', 4, "ProtocolError", ["not valid JSON", "control"]),
    ("op-list", '{"id": 5, "op": ["status"]}', 5, "ProtocolError", ["unknown op"]),
    ("pixels-huge", json.dumps({"id": 6, "op": "load_backbone", "name": "medlora_tiny", "pixels": 10**30,
                                "allow_random_init": True}), 6, "ProtocolError", ["pixels", "1024"]),
    ("flag-as-string", json.dumps({"id": 7, "op": "load_backbone", "name": "medlora_tiny",
                                   "allow_random_init": "false"}), 7, "ProtocolError", ["allow_random_init"]),
    ("nul-in-path", json.dumps({"id": 8, "op": "attach_adapter", "path": "a\x00b"}), 8, "ProtocolError", ["NUL"]),
    ("patches-1e25", json.dumps({"id": 9, "op": "score", "patches": _patches(1e25), "tta": False}), 9,
     "NonFiniteResultError", ["patch 0", "overflowed", "1e+25", "patch_spec"]),
    ("patches-max-float32", json.dumps({"id": 9, "op": "score", "patches": _patches(3.4e38)}), 9,
     "NonFiniteResultError", ["overflowed"]),
    ("patches-inf", json.dumps({"id": 10, "op": "score", "patches": _patches(np.inf)}), 10, "PatchError",
     ["NaN or infinite"]),
    ("patches-nan", json.dumps({"id": 10, "op": "score", "patches": _patches(np.nan)}), 10, "PatchError",
     ["NaN or infinite"]),
    ("dtype-float64", json.dumps({"id": 11, "op": "score", "patches": _blob(np.zeros(SHAPE), "float64")}), 11,
     "ProtocolError", ["dtype"]),
    ("dtype-list", json.dumps({"id": 11, "op": "score", "patches": {**_blob(np.zeros(SHAPE)), "dtype": []}}), 11,
     "ProtocolError", ["dtype"]),
    ("shape-wrong", json.dumps({"id": 12, "op": "score", "patches": {**_blob(np.zeros(SHAPE)), "shape": [1, 3, 32]}}),
     12, "ProtocolError", ["bytes", "needs"]),
    ("shape-huge", json.dumps({"id": 12, "op": "score", "patches": {**_blob(np.zeros(SHAPE)),
                                                                    "shape": [0, 2**40], "data": ""}}),
     12, "ProtocolError", ["shape", "2**31"]),
    ("shape-many-dims", json.dumps({"id": 12, "op": "score", "patches": {**_blob(np.zeros(SHAPE)),
                                                                         "shape": [1] * 40}}),
     12, "ProtocolError", ["shape"]),
    ("shape-for-other-adapter", json.dumps({"id": 13, "op": "score", "patches": _blob(np.zeros((1, 9, 32, 32)))}),
     13, "PatchError", ["reads", "patch_spec"]),
    ("bad-base64", json.dumps({"id": 14, "op": "score", "patches": {**_blob(np.zeros(SHAPE)), "data": "%%%="}}),
     14, "ProtocolError", ["base64"]),
    ("patches-not-object", json.dumps({"id": 15, "op": "score", "patches": "AAAA"}), 15, "ProtocolError", ["object"]),
    ("tta-string", json.dumps({"id": 16, "op": "score", "patches": _patches(0.5), "tta": "yes"}), 16,
     "ProtocolError", ["tta"]),
]


@pytest.mark.parametrize("line, reply_id, error_type, words", [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_an_error_reply_and_the_engine_lives(server, adapter_path, line, reply_id, error_type,
                                                              words):
    before = tree_digest(adapter_path, server.store)
    reply = _ask(server, line)
    assert reply["ok"] is False and reply["id"] == reply_id
    assert reply["error"]["type"] == error_type, reply
    assert all(word in reply["error"]["message"] for word in words), reply["error"]["message"]
    status = _ask(server, '{"id": "after", "op": "status"}')
    assert status["ok"] and status["result"]["adapters"] == ["site-a"]
    assert tree_digest(adapter_path, server.store) == before


def test_finite_patches_still_score(server):
    """The guards refuse only what is broken: large but harmless values score normally."""
    reply = _ask(server, json.dumps({"id": 1, "op": "score", "patches": _patches(1e4, count=2), "tta": False}))
    assert reply["ok"] and len(reply["result"]["results"]) == 2
    assert all(np.isfinite(r["probability"]) for r in reply["result"]["results"])


# --------------------------------------------------------------------------------------------
# Reading the stream: bytes, \n only, capped lines
# --------------------------------------------------------------------------------------------
def test_reader_splits_on_newline_only_and_caps_lines():
    long_line = b'{"id": 77, "op": "score", "pad": "' + b"x" * 5000 + b'"}'
    stream = io.BytesIO(b'{"id": 1,\r"op": "status"}\r\n' + long_line + b"\n" + b"a\rb\n" + b"c" * 1024 + b"\n"
                        + b"tail-without-newline")
    items = list(read_requests(stream, max_bytes=1024))
    assert items[0] == b'{"id": 1,\r"op": "status"}\r\n'
    assert isinstance(items[1], OversizedRequest) and items[1].size == len(long_line)
    assert items[1].request_id == 77 and items[1].limit == 1024
    assert items[2:] == [b"a\rb\n", b"c" * 1024 + b"\n", b"tail-without-newline"]  # exactly at the cap is fine


def test_run_answers_every_line_in_order(server):
    """\r inside a line keeps it whole; an over-long line is answered with its id; the next line is served."""
    lines: list[str] = []
    alive = EngineServer(server.engine, lines.append)
    stream = io.BytesIO(b'{"id": 1, "op":\r"status"}\n'        # \r between tokens: one valid request
                        b'{"id": 2, "op": "stat\rus"}\n'        # \r inside a string: one error, not two
                        b'{"id": 3, "op": "status", "pad": "' + b"y" * 3000 + b'"}\n'
                        b'{"id": "4", "op": "status", "x": NaN}\n'
                        b"\xff\xfe\xfd\n"
                        b'{"id": 5, "op": "status"}\n')
    assert alive.run(read_requests(stream, max_bytes=1024)) == 0
    replies = [_strict(line) for line in lines]
    assert replies[0]["event"] == "ready"
    assert [(r["id"], r["ok"]) for r in replies[1:]] == [(1, True), (2, False), (3, False), ("4", False),
                                                         (None, False), (5, True)]
    assert "longer than the limit of 1024 bytes" in replies[3]["error"]["message"]
    assert "--max-request-bytes" in replies[3]["error"]["message"]
    assert "UTF-8" in replies[5]["error"]["message"]


def test_default_cap_fits_a_nine_view_batch_of_64_nodules_at_224_px():
    raw = 64 * 9 * 224 * 224 * 4
    request = len(json.dumps({"id": 1, "op": "score", "adapter": "x" * 64, "tta": True,
                              "patches": {"dtype": "float32", "shape": [64, 9, 224, 224], "data": ""}}))
    assert request + 4 * -(-raw // 3) < DEFAULT_MAX_REQUEST_BYTES  # base64: 4 characters per 3 bytes


def test_over_long_line_is_skipped_in_bounded_memory():
    """A 64 MiB line through a real pipe, capped at 1 MiB: memory stays near the cap, the next line comes."""
    read_fd, write_fd = os.pipe()

    def feed():
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(b'{"id": 9, "op": "status", "pad": "')
            chunk = b"z" * (1 << 20)
            for _ in range(64):
                pipe.write(chunk)
            pipe.write(b'"}\n{"id": 10, "op": "status"}\n')

    writer = threading.Thread(target=feed)
    writer.start()
    tracemalloc.start()
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            items = list(read_requests(pipe, max_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        writer.join()
    assert isinstance(items[0], OversizedRequest) and items[0].request_id == 9
    assert items[0].size == 64 * (1 << 20) + len(b'{"id": 9, "op": "status", "pad": ""}')
    assert items[1] == b'{"id": 10, "op": "status"}\n'
    assert peak < 8 * (1 << 20), f"peak {peak / 2**20:.1f} MiB while skipping a 64 MiB line"


# --------------------------------------------------------------------------------------------
# The real process
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_process_survives_malformed_bytes(adapter_path, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEDLORA_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    before = tree_digest(adapter_path)
    requests = [
        b'{"id": NaN, "op": "status"}',
        b'{"id": 2, "op": "sta\rtus"}',
        b'{"id": 3,\r"op": "status"}',
        b'{"id": 4, "op": "status", "x": "\xff"}',
        b'{"id": 5, "op": "status", "pad": "' + b"p" * 100_000 + b'"}',
        json.dumps({"id": 6, "op": "attach_adapter", "path": str(adapter_path)}).encode(),
        json.dumps({"id": 7, "op": "score", "patches": _patches(1e25), "tta": False}).encode(),
        json.dumps({"id": 8, "op": "score", "patches": _patches(0.5), "tta": False}).encode(),
        b"\x00\x01\x02",
        b'{"id": 9, "op": "status"}',
        b'{"id": 10, "op": "shutdown"}',
    ]
    process = subprocess.run([sys.executable, "-m", "MedLoRALib", "serve", "--device", "cpu",
                              "--max-request-bytes", "65536"],
                             input=b"\n".join(requests) + b"\n", capture_output=True, env=env, timeout=240)
    assert process.returncode == 0, process.stderr.decode(errors="replace")
    replies = [_strict(line) for line in process.stdout.decode("ascii").splitlines()]
    assert replies[0]["event"] == "ready" and len(replies) == 1 + len(requests)
    assert [(r["id"], r["ok"]) for r in replies[1:]] == [
        (None, False), (2, False), (3, True), (4, False), (5, False), (6, True), (7, False), (8, True),
        (None, False), (9, True), (10, True)]
    assert "longer than the limit of 65536 bytes" in replies[5]["error"]["message"]
    assert replies[7]["error"]["type"] == "NonFiniteResultError"
    assert replies[10]["result"]["adapters"] == ["site-a"]
    assert "Traceback" not in process.stderr.decode(errors="replace")
    assert tree_digest(adapter_path) == before


@pytest.mark.parametrize("value, words", [("10", "at least 1024"), ("lots", "whole number")])
def test_max_request_bytes_option_is_checked(capsys, value, words):
    from MedLoRALib.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser("serve").parse_args(["serve", "--max-request-bytes", value])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err
    assert build_parser("serve").parse_args(["serve"]).max_request_bytes == DEFAULT_MAX_REQUEST_BYTES
