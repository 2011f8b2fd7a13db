"""``medlora serve``: the JSON-lines protocol, in process and as a real child process."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from MedLoRALib.adapters.store import AdapterStore
from MedLoRALib.engine import ScoringEngine
from MedLoRALib.patches import PatchSpec
from MedLoRALib.serve import EngineServer, decode_patches

torch.set_num_threads(1)  # a busy 2-core CI machine: more threads only contend
SPEC = PatchSpec(views="ortho3", pixels=32)


def _blob(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return {"dtype": "float32", "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


@pytest.fixture(scope="module")
def adapter_path(tiny_adapter):
    return tiny_adapter("site-a", SPEC, scale=0.0, head_bias=0.3)


@pytest.fixture
def server(tmp_path):
    lines: list[str] = []
    engine = ScoringEngine(device="cpu", store=AdapterStore(tmp_path / "store"))
    server = EngineServer(engine, lines.append)
    server.lines = lines
    return server


def _ask(server, request) -> dict:
    line = request if isinstance(request, str) else json.dumps(request)
    return server.handle(line)


def test_decode_patches_checks_everything():
    array = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    assert np.array_equal(decode_patches(_blob(array)), array)
    from MedLoRALib.serve import ProtocolError

    for bad, message in [({**_blob(array), "dtype": "float64"}, "dtype"),
                         ({**_blob(array), "shape": [2, 3, 4]}, "bytes"),
                         ({**_blob(array), "shape": [2, -3, 4, 4]}, "shape"),
                         ({**_blob(array), "data": "***not base64***"}, "base64"),
                         ("nope", "object")]:
        with pytest.raises(ProtocolError, match=message):
            decode_patches(bad)


def test_protocol_operations(server, adapter_path):
    status = _ask(server, {"id": 1, "op": "status"})
    assert status == {"id": 1, "ok": True, "result": {"backbone": [], "adapters": [], "active": None,
                                                      "device": "cpu", "version": status["result"]["version"]}}
    loaded = _ask(server, {"id": 2, "op": "load_backbone", "name": "medlora_tiny", "pixels": 32,
                           "allow_random_init": True})
    assert loaded["ok"] and loaded["result"]["backbone"] == "medlora_tiny"
    attached = _ask(server, {"id": 2, "op": "attach_adapter", "path": str(adapter_path), "name": "a"})
    assert attached["ok"] and attached["result"]["name"] == "a"
    assert server.engine.backbone_loads == 1  # the adapter used the backbone loaded ahead
    assert attached["result"]["manifest"]["patch_spec"]["views"] == "ortho3"
    _ask(server, {"id": 3, "op": "attach_adapter", "path": str(adapter_path), "name": "b"})
    assert _ask(server, {"id": 4, "op": "set_adapter", "name": "a"})["result"] == {"active": "a"}
    patches = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    scored = _ask(server, {"id": 5, "op": "score", "patches": _blob(patches), "tta": False})
    results = scored["result"]["results"]
    assert len(results) == 2 and results[0]["adapter"] == "a" and results[0]["random_init"] is True
    direct = server.engine.score_patches(patches, "a", tta=False)
    assert results == direct
    via_b = _ask(server, {"id": 6, "op": "score", "patches": _blob(patches), "adapter": "b"})["result"]["results"]
    assert via_b[0]["adapter"] == "b"
    for tta in ("rot4", 2):  # a named set or a count of test-time variants
        scored = _ask(server, {"id": 6, "op": "score", "patches": _blob(patches), "adapter": "b", "tta": tta})
        assert scored["result"]["results"] == server.engine.score_patches(patches, "b", tta=tta)
    assert _ask(server, {"id": 7, "op": "detach_adapter", "name": "b"})["result"] == {"adapters": ["a"]}
    assert _ask(server, {"id": 8, "op": "shutdown"}) == {"id": 8, "ok": True, "result": {}}
    assert server.stopped


@pytest.mark.parametrize("request_line, error_type, words", [
    ("{broken json", "ProtocolError", "not valid JSON"),
    ("[1, 2]", "ProtocolError", "JSON object"),
    (json.dumps({"id": 9, "op": "explode"}), "ProtocolError", "unknown op 'explode'"),
    (json.dumps({"id": 9}), "ProtocolError", "no 'op'"),
    (json.dumps({"id": 9, "op": "set_adapter", "name": "ghost"}), "AdapterError", "not attached"),
    (json.dumps({"id": 9, "op": "set_adapter"}), "ProtocolError", "'name'"),
    (json.dumps({"id": 9, "op": "load_backbone", "name": "no_such_vit"}), "ModelError", "no_such_vit"),
    (json.dumps({"id": 9, "op": "attach_adapter", "path": "/no/such/adapter"}), "AdapterError", "neither"),
    (json.dumps({"id": 9, "op": "score", "patches": {"dtype": "float32", "shape": [1, 3, 32, 32],
                                                     "data": "%%%"}}), "ProtocolError", "base64"),
    (json.dumps({"id": 9, "op": "score", "patches": _blob(np.zeros((1, 9, 32, 32)))}), "PatchError", "reads"),
    (json.dumps({"id": 9, "op": "score", "patches": _blob(np.zeros((1, 3, 32, 32))), "tta": "yes"}),
     "ProtocolError", "tta"),
    (json.dumps({"id": 9, "op": "score", "patches": _blob(np.zeros((1, 3, 32, 32))), "tta": 3}),
     "ProtocolError", "'tta': unknown test-time augmentation 3"),
])
def test_bad_requests_get_error_responses(server, adapter_path, request_line, error_type, words):
    _ask(server, {"id": 1, "op": "attach_adapter", "path": str(adapter_path)})
    response = _ask(server, request_line)
    assert response["ok"] is False
    assert response["error"]["type"] == error_type and words in response["error"]["message"]
    assert response["id"] == (9 if request_line.startswith("{\"id\"") else None)
    assert _ask(server, {"id": 10, "op": "status"})["ok"]  # still serving


def test_run_loop_answers_every_line_then_stops(server, adapter_path):
    requests = ["{oops", json.dumps({"id": 1, "op": "status"}), "", json.dumps({"id": 2, "op": "shutdown"}),
                json.dumps({"id": 3, "op": "status"})]
    assert server.run(iter(requests)) == 0
    messages = [json.loads(line) for line in server.lines]
    assert messages[0]["event"] == "ready" and messages[0]["device"] == "cpu"
    assert [m.get("id") for m in messages[1:]] == [None, 1, 2]  # nothing after shutdown
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in server.lines)


@pytest.mark.slow
def test_serve_process_survives_bad_requests(adapter_path, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEDLORA_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    patches = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    requests = [
        "not json at all",
        json.dumps({"id": 1, "op": "nope"}),
        json.dumps({"id": 2, "op": "attach_adapter", "path": str(adapter_path)}),
        json.dumps({"id": 3, "op": "score", "patches": {"dtype": "float32", "shape": [2, 3, 32, 32], "data": "@@"}}),
        json.dumps({"id": 4, "op": "score", "patches": _blob(patches[:, :2])}),
        json.dumps({"id": 5, "op": "set_adapter", "name": "unknown"}),
        "\xff\xfe binary-ish",
        json.dumps({"id": 6, "op": "score", "patches": _blob(patches), "tta": False}),
        json.dumps({"id": 7, "op": "status"}),
        json.dumps({"id": 8, "op": "shutdown"}),
    ]
    process = subprocess.run([sys.executable, "-m", "MedLoRALib", "serve", "--device", "cpu"],
                             input="\n".join(requests) + "\n", capture_output=True, text=True, env=env, timeout=240)
    assert process.returncode == 0, process.stderr
    messages = [json.loads(line) for line in process.stdout.splitlines()]  # stdout: protocol lines only
    assert messages[0]["event"] == "ready"
    by_id = {m.get("id"): m for m in messages[1:]}
    assert len(messages) == 1 + len(requests)
    assert [m["ok"] for m in messages[1:]] == [False, False, True, False, False, False, False, True, True, True]
    assert by_id[6]["result"]["results"][0]["random_init"] is True
    assert by_id[7]["result"]["adapters"] == ["site-a"]
    assert "randomly initialised" in process.stderr  # logs go to stderr
