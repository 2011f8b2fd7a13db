"""Several adapters scored as one ensemble: through the engine, the engine protocol, the CLI, the SR and
the Slicer results table. The combination rule itself (``ensemble.combine``) is tested in test_ensemble.py;
here every number is checked against scoring each member alone.
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from helpers import save_tiny_adapter

from MedLoRALib.engine import ScoringEngine
from MedLoRALib.errors import AdapterError
from MedLoRALib.patches import PatchSpec

torch.set_num_threads(1)
SPEC = PatchSpec(views="ortho3", fov_mm=50.0, pixels=32)  # one 32 px image per nodule: fast
PATCHES = np.random.default_rng(3).random((4, 3, 32, 32), dtype=np.float32)
# Head biases that put one member well above and one well below 0.5: the members disagree.
MEMBERS = {"site-a": dict(seed=1, head_bias=3.0), "site-b": dict(seed=2, head_bias=-3.0),
           "site-c": dict(seed=3, head_bias=0.0)}


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three tiny LoRA adapters on one (random-init) backbone and patch spec, one of them at threshold 0.3."""
    root = tmp_path_factory.mktemp("members")
    return {name: save_tiny_adapter(root, name, SPEC, manifest={"threshold": 0.3} if name == "site-c" else None,
                                    **options)[0]
            for name, options in MEMBERS.items()}


@pytest.fixture
def engine(members):
    engine = ScoringEngine(device="cpu")
    for path in members.values():
        engine.attach_adapter(path)
    return engine


def _alone(engine, names, patches=PATCHES, tta=False):
    return np.array([[r["probability"] for r in engine.score_patches(patches, name, tta=tta)] for name in names])


# --- engine -------------------------------------------------------------------------------------
def test_ensemble_equals_each_member_scored_alone_on_one_loaded_backbone(engine):
    names = ["site-a", "site-b", "site-c"]
    loads = engine.backbone_loads
    assert loads == 1  # three LoRA adapters share one backbone
    results = engine.score_patches_ensemble(PATCHES, names, tta=False)
    assert engine.backbone_loads == loads  # no reload to switch members
    alone = _alone(engine, names)
    members = np.array([[m["probability"] for m in r["members"]] for r in results]).T
    np.testing.assert_allclose(members, alone, rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["probability"] for r in results], alone.mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["spread"] for r in results], alone.std(axis=0), rtol=0, atol=1e-6)
    thresholds = np.array([0.5, 0.5, 0.3])
    positive = alone >= thresholds[:, None]
    assert [r["disagree"] for r in results] == (positive.any(0) & ~positive.all(0)).tolist()
    assert any(r["disagree"] for r in results)  # the biases make site-a and site-b disagree
    first = results[0]
    assert first["adapters"] == names and first["adapter"] == "site-a+site-b+site-c"
    assert first["threshold"] == pytest.approx(thresholds.mean())
    assert first["label"] == ("malignant" if first["probability"] >= thresholds.mean() else "benign")
    assert [m["adapter"] for m in first["members"]] == names
    assert first["adapter_version"] == "+".join(engine.manifest(n).version_id for n in names)
    assert first["random_init"] is True  # the tiny backbone is random-init, and the ensemble says so


def test_ensemble_with_tta_matches_members_with_tta(engine):
    names = ["site-b", "site-a"]
    results = engine.score_patches_ensemble(PATCHES[:2], names, tta=True)
    np.testing.assert_allclose([r["probability"] for r in results],
                               _alone(engine, names, PATCHES[:2], tta=True).mean(axis=0), rtol=0, atol=1e-6)
    assert results[0]["adapters"] == names  # members in the order asked


def test_a_full_fine_tuned_adapter_may_join_when_backbone_and_spec_match(members, tmp_path):
    engine = ScoringEngine(device="cpu")
    engine.attach_adapter(members["site-a"])
    full, _ = save_tiny_adapter(tmp_path, "full", SPEC, seed=7, mode="full")
    engine.attach_adapter(full)
    loads = engine.backbone_loads
    results = engine.score_patches_ensemble(PATCHES, ["site-a", "full"], tta=False)
    assert engine.backbone_loads == loads == 2  # the full adapter brought its own network, once
    np.testing.assert_allclose([r["probability"] for r in results],
                               _alone(engine, ["site-a", "full"]).mean(axis=0), rtol=0, atol=1e-6)


def test_a_set_with_other_preprocessing_or_backbone_is_refused_naming_both(engine, tmp_path):
    other_spec, _ = save_tiny_adapter(tmp_path, "wide", PatchSpec(views="ortho3", fov_mm=64.0, pixels=32), seed=4)
    engine.attach_adapter(other_spec)
    with pytest.raises(AdapterError, match=r"'site-a' and 'wide'.*preprocessing \(patch spec\) differ"):
        engine.score_patches_ensemble(PATCHES, ["site-a", "wide"])
    other_backbone, _ = save_tiny_adapter(tmp_path, "synth", SPEC, seed=5, backbone="medlora_tiny_synthct")
    engine.attach_adapter(other_backbone)
    with pytest.raises(AdapterError, match=r"'site-b' and 'synth'.*backbone differ"):
        engine.score_patches_ensemble(PATCHES, ["site-b", "synth"])
    with pytest.raises(AdapterError, match="named twice"):
        engine.score_patches_ensemble(PATCHES, ["site-a", "site-a"])
    with pytest.raises(AdapterError, match="at least two"):
        engine.score_patches_ensemble(PATCHES, ["site-a"])
    with pytest.raises(AdapterError, match="'nowhere' is not attached"):
        engine.score_patches_ensemble(PATCHES, ["site-a", "nowhere"])


# --- engine protocol ------------------------------------------------------------------------------
def _encode(patches):
    data = base64.b64encode(np.ascontiguousarray(patches, np.float32).tobytes()).decode("ascii")
    return {"dtype": "float32", "shape": list(patches.shape), "data": data}


def test_serve_scores_an_ensemble_and_keeps_the_single_adapter_request(engine):
    from MedLoRALib.serve import EngineServer

    server = EngineServer(engine, lambda _: None)
    request = {"id": 1, "op": "score", "patches": _encode(PATCHES), "tta": False}
    reply = server.handle(json.dumps({**request, "adapters": ["site-a", "site-b"]}))
    assert reply["ok"], reply
    direct = engine.score_patches_ensemble(PATCHES, ["site-a", "site-b"], tta=False)
    assert reply["result"]["results"] == json.loads(json.dumps(direct))
    assert {"probability", "spread", "disagree", "label", "threshold", "adapters", "members"} <= set(direct[0])
    single = server.handle(json.dumps({**request, "adapter": "site-a"}))  # unchanged: one adapter, no ensemble
    assert single["ok"] and "spread" not in single["result"]["results"][0]
    assert single["result"]["results"][0]["probability"] == direct[0]["members"][0]["probability"]


def test_serve_answers_a_bad_ensemble_with_an_error_and_carries_on(engine, tmp_path):
    from MedLoRALib.serve import EngineServer

    wide, _ = save_tiny_adapter(tmp_path, "wide", PatchSpec(views="ortho3", fov_mm=64.0, pixels=32), seed=4)
    engine.attach_adapter(wide)
    server = EngineServer(engine, lambda _: None)
    request = {"id": 2, "op": "score", "patches": _encode(PATCHES), "tta": False}
    cases = {
        "AdapterError": ({"adapters": ["site-a", "wide"]}, r"'site-a' and 'wide' cannot be combined.*patch spec"),
        "ProtocolError": ({"adapters": "site-a,site-b"}, "list of 1 to 64 adapter names"),
    }
    for kind, (extra, message) in cases.items():
        reply = server.handle(json.dumps({**request, **extra}))
        assert reply["id"] == 2 and not reply["ok"] and reply["error"]["type"] == kind
        assert re.search(message, reply["error"]["message"]), reply
    both = server.handle(json.dumps({**request, "adapter": "site-a", "adapters": ["site-a", "site-b"]}))
    assert not both["ok"] and "either 'adapter'" in both["error"]["message"]
    assert server.handle(json.dumps({**request, "adapters": ["site-a", "site-b"]}))["ok"]  # still serving
