"""The scoring fast paths (docs/perf.md): int8 and bf16 agree with fp32, fp32 stays untouched.

The benchmark set is the one ``benchmarks/scoring.py`` scores: patches cut around the
synthetic phantom's nodules. The tolerance stated for int8 (dynamic quantisation of the
backbone's linear layers, LoRA merged) is ``INT8_PROBABILITY_TOLERANCE`` on probabilities,
and the same label wherever fp32 lies farther than that from the threshold (nearer, int8
may flip it: here one probe nodule at p = 0.4978 became 0.5021).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import save_tiny_adapter

from MedLoRALib import device as device_module
from MedLoRALib.device import PRECISION_ENV_VAR, choose_precision, prepare_for_precision
from MedLoRALib.engine import ScoringEngine
from MedLoRALib.errors import ModelError
from MedLoRALib.models import LoraSpec
from MedLoRALib.patches import PatchSpec, extract_patches
from MedLoRALib.synthetic import make_phantom

torch.set_num_threads(1)
SPEC = PatchSpec(views="multiview9", pixels=64)
SMALL = PatchSpec(views="ortho3", pixels=32)
INT8_PROBABILITY_TOLERANCE = 0.03  # measured up to 0.027 with random-init tiny ViTs
BF16_PROBABILITY_TOLERANCE = 0.02
CPU = torch.device("cpu")
needs_int8 = pytest.mark.skipif(device_module.cpu_features()["int8_engine"] is None,
                                reason="this torch build has no int8 CPU kernels")


def _benchmark_patches(spec: PatchSpec, n: int = 12) -> np.ndarray:
    """Patches around the phantom's nodules, jittered as in benchmarks/scoring.py."""
    image, nodules = make_phantom(seed=0)
    base = np.array([nd.centre_lps for nd in nodules])
    centres = base[np.arange(n) % len(base)] + np.random.default_rng(0).uniform(-3, 3, size=(n, 3))
    return extract_patches(image, centres, spec)


def _probabilities(results) -> np.ndarray:
    return np.array([r["probability"] for r in results])


@pytest.fixture
def engine(tmp_path, monkeypatch):
    from MedLoRALib.adapters.store import AdapterStore

    monkeypatch.delenv(PRECISION_ENV_VAR, raising=False)
    return ScoringEngine(device="cpu", store=AdapterStore(tmp_path / "store"))


@pytest.mark.slow
@needs_int8
def test_int8_matches_fp32_on_the_benchmark_set_for_shared_lora_and_probe(tmp_path, engine):
    torch.manual_seed(0)  # peft draws LoRA A's initial values from the global generator
    patches = _benchmark_patches(SPEC, n=6)
    paths = {
        "qv": save_tiny_adapter(tmp_path, "qv", SPEC, seed=1, lora=LoraSpec(rank=8, targets="qv"), scale=0.05)[0],
        "all": save_tiny_adapter(tmp_path, "all", SPEC, seed=2, lora=LoraSpec(rank=4, targets="all"),
                                 scale=0.05, head_bias=0.3)[0],
        "probe": save_tiny_adapter(tmp_path, "probe", SPEC, seed=3, mode="linear", scale=0.05)[0],
    }
    for name, path in paths.items():
        engine.attach_adapter(path, name=name)
    fp32_before = {name: engine.score_patches(patches, name, tta=False) for name in paths}
    int8 = {name: engine.score_patches(patches, name, tta=False, precision="int8") for name in paths}
    for name in paths:
        difference = np.abs(_probabilities(int8[name]) - _probabilities(fp32_before[name]))
        assert difference.max() <= INT8_PROBABILITY_TOLERANCE, name
        assert difference.max() > 0, name  # the quantised path really ran
        # the label is the same wherever fp32 is farther than the tolerance from the threshold (0.5)
        clear = np.abs(_probabilities(fp32_before[name]) - 0.5) > INT8_PROBABILITY_TOLERANCE
        assert clear.sum() >= 3, name  # the check has nodules to check
        assert [r["label"] for r, c in zip(int8[name], clear) if c] == \
            [r["label"] for r, c in zip(fp32_before[name], clear) if c], name
    # the fp32 path is untouched: same models, same LoRA weights, bit-identical scores
    for name in paths:
        assert engine.score_patches(patches, name, tta=False) == fp32_before[name]
    # each adapter's int8 copy is its own (its LoRA merged, or none for the probe)
    assert len({tuple(_probabilities(results)) for results in int8.values()}) == 3


def _fp32_and(engine, tmp_path, precision: str, seed: int, tta: bool) -> tuple[np.ndarray, np.ndarray]:
    """A tiny adapter "a" attached; its probabilities on four patches in fp32 and at ``precision``."""
    torch.manual_seed(0)
    patches = _benchmark_patches(SMALL, n=4)
    path, _ = save_tiny_adapter(tmp_path, "a", SMALL, seed=seed, scale=0.05)
    engine.attach_adapter(path)
    return (_probabilities(engine.score_patches(patches, tta=tta)),
            _probabilities(engine.score_patches(patches, tta=tta, precision=precision)))


@needs_int8
def test_int8_with_tta_and_the_copy_dropped_on_detach(tmp_path, engine):
    fp32, int8 = _fp32_and(engine, tmp_path, "int8", seed=4, tta=True)
    assert np.abs(int8 - fp32).max() <= INT8_PROBABILITY_TOLERANCE
    assert ("a", "int8") in engine._fast_models
    engine.detach_adapter("a")
    assert not engine._fast_models


@needs_int8
def test_prepare_for_int8_leaves_the_model_alone(tmp_path):
    torch.manual_seed(0)
    _, model = save_tiny_adapter(tmp_path, "a", SMALL, seed=5, scale=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = prepare_for_precision(model, "int8", lora_name="default")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert prepare_for_precision(model, "fp32", lora_name="default") is model
    kinds = {type(m).__module__ for m in fast.vit.modules()}
    assert any("quantized" in kind for kind in kinds) and not any("peft" in kind for kind in kinds)
    patches = torch.from_numpy(_benchmark_patches(SMALL, n=3))
    with torch.inference_mode():
        close = torch.sigmoid(fast(patches)) - torch.sigmoid(model(patches))
    assert close.abs().max() <= INT8_PROBABILITY_TOLERANCE


def test_bf16_autocast_on_the_cpu_is_close_to_fp32(tmp_path, engine, caplog):
    fp32, bf16 = _fp32_and(engine, tmp_path, "bf16", seed=6, tta=False)
    assert 0 < np.abs(bf16 - fp32).max() <= BF16_PROBABILITY_TOLERANCE
    features = device_module.cpu_features()
    emulated = not (features["amx"] or features["avx512_bf16"])
    assert ("bf16 is emulated" in caplog.text) == emulated


def test_choose_precision_defaults_env_and_errors(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV_VAR, raising=False)
    assert choose_precision(CPU) == "fp32" and choose_precision(CPU, "auto") == "fp32"
    assert choose_precision(torch.device("cuda")) == "bf16"  # the engine's CUDA behaviour, unchanged
    monkeypatch.setenv(PRECISION_ENV_VAR, "bf16")
    assert choose_precision(CPU) == "bf16"
    assert choose_precision(CPU, "fp32") == "fp32"  # an explicit choice beats the environment
    monkeypatch.setenv(PRECISION_ENV_VAR, "fp16")
    with pytest.raises(ModelError, match=f"{PRECISION_ENV_VAR}=fp16"):
        choose_precision(CPU)
    with pytest.raises(ModelError, match="CPU only"):
        choose_precision(torch.device("cuda"), "int8")
    # a CPU/torch without int8 kernels: a clear error for an explicit request, fp32 by default
    monkeypatch.delenv(PRECISION_ENV_VAR)
    features = {**device_module.cpu_features(), "int8_engine": None}
    monkeypatch.setattr(device_module, "cpu_features", lambda: features)
    with pytest.raises(ModelError, match="no int8 CPU kernels.*fp32"):
        choose_precision(CPU, "int8")
    assert choose_precision(CPU) == "fp32"


def test_engine_precision_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(PRECISION_ENV_VAR, "int8" if device_module.cpu_features()["int8_engine"] else "bf16")
    assert ScoringEngine(device="cpu").precision == device_module.os.environ[PRECISION_ENV_VAR]
    monkeypatch.setenv(PRECISION_ENV_VAR, "fp32")
    assert ScoringEngine(device="cpu", precision="bf16").precision == "bf16"


def test_peak_estimate_is_sane():
    peak = device_module.cpu_peak_gflops(2)
    assert peak["fp32_lanes"] in (4, 8, 16) and peak["fp32_gflops"] >= 0
