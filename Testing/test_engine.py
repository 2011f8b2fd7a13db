"""The scoring engine: shared backbone, adapter switching, TTA, determinism, provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import save_tiny_adapter
from safetensors.torch import save_file

from MedLoRALib.adapters import AdapterManifest
from MedLoRALib.adapters.package import save_adapter
from MedLoRALib.engine import ScoringEngine, apply_tta
from MedLoRALib.errors import AdapterError, PatchError
from MedLoRALib.geometry import Geometry
from MedLoRALib.image import CTImage
from MedLoRALib.models import LoraSpec, create_backbone
from MedLoRALib.nodule import Nodule
from MedLoRALib.patches import PatchSpec, extract_patches
from MedLoRALib.tta import TTA_BY_COUNT, TTA_SETS, TTA_TRANSFORMS, TTAError, resolve_tta

torch.set_num_threads(1)  # a busy 2-core CI machine: more threads only contend
SPEC = PatchSpec(views="multiview9", pixels=64)
PATCHES = np.random.default_rng(0).random((3, 9, 64, 64), dtype=np.float32)
SMALL = PatchSpec(views="ortho3", pixels=32)  # fast: one 32 px image per nodule
SMALL_PATCHES = np.random.default_rng(1).random((3, 3, 32, 32), dtype=np.float32)


def _adapter(tmp_path, name, seed, mode="lora", lora=None, spec=SPEC, weights=None, **manifest):
    return save_tiny_adapter(tmp_path, name, spec, seed=seed, mode=mode, lora=lora, weights=weights,
                             manifest=manifest)


def _expected(model, patches, temperature=1.0):
    """Probabilities straight from the trained model (no TTA), computed as the engine does."""
    with torch.inference_mode():
        logits = model.view_logits(torch.from_numpy(patches)).numpy().astype(np.float64) / temperature
    return 1.0 / (1.0 + np.exp(-logits.mean(axis=1)))


def _probabilities(results):
    return np.array([r["probability"] for r in results])


@pytest.fixture
def engine(tmp_path):
    from MedLoRALib.adapters.store import AdapterStore

    return ScoringEngine(device="cpu", store=AdapterStore(tmp_path / "store"))


def test_round_trip_into_a_fresh_engine_is_bit_identical(tmp_path, engine):
    path, model = _adapter(tmp_path, "site-a", seed=1)
    engine.attach_adapter(path)
    results = engine.score_patches(PATCHES, tta=False)
    assert np.array_equal(_probabilities(results), _expected(model, PATCHES))
    other = ScoringEngine(device="cpu", store=engine.store)
    other.attach_adapter(path)
    assert other.score_patches(PATCHES, tta=False) == results
    first = results[0]
    assert set(first) >= {"probability", "logit", "view_probabilities", "label", "adapter", "adapter_version",
                          "random_init"}
    assert len(first["view_probabilities"]) == 9 and first["adapter"] == "site-a"
    assert first["adapter_version"] == engine.manifest("site-a").version_id


def test_two_adapters_share_one_backbone_and_switch(tmp_path, engine):
    path_a, model_a = _adapter(tmp_path, "a", seed=1)
    path_b, model_b = _adapter(tmp_path, "b", seed=2, lora=LoraSpec(rank=4, last_n_blocks=3))
    engine.attach_adapter(path_a)
    engine.attach_adapter(path_b)
    assert engine.backbone_loads == 1
    assert engine._adapters["a"].model.vit is engine._adapters["b"].model.vit
    expected = {"a": _expected(model_a, PATCHES), "b": _expected(model_b, PATCHES)}
    assert not np.allclose(expected["a"], expected["b"])
    for name in ("a", "b", "a", "b"):
        engine.set_adapter(name)
        assert np.array_equal(_probabilities(engine.score_patches(PATCHES, tta=False)), expected[name])
    assert engine.backbone_loads == 1


def test_manifest_from_before_last_n_blocks_loads_as_every_block(tmp_path, engine):
    """Adapters written before ``last_n_blocks`` existed have no such key: LoRA on every block."""
    import json

    path, model = _adapter(tmp_path, "old", seed=1, spec=SMALL)
    manifest_file = path / "manifest.json"
    data = json.loads(manifest_file.read_text())
    assert data["lora"].pop("last_n_blocks") is None
    manifest_file.write_text(json.dumps(data))
    engine.attach_adapter(path)
    assert engine.manifest("old").lora.get("last_n_blocks") is None
    assert np.array_equal(_probabilities(engine.score_patches(SMALL_PATCHES, tta=False)),
                          _expected(model, SMALL_PATCHES))


def test_linear_full_and_other_targets_beside_each_other(tmp_path, engine):
    adapters = {
        "qkv": _adapter(tmp_path, "qkv", 3, lora=LoraSpec(targets="qkv")),
        "all": _adapter(tmp_path, "all", 4, lora=LoraSpec(targets="all", rank=2)),
        "linear": _adapter(tmp_path, "linear", 5, mode="linear"),
        "full": _adapter(tmp_path, "full", 6, mode="full"),
        "qv": _adapter(tmp_path, "qv", 7),
        "axial": _adapter(tmp_path, "axial", 8, spec=PatchSpec(views="axial", pixels=48)),
    }
    for path, _ in adapters.values():
        engine.attach_adapter(path)
    # qkv, all and linear share the fused backbone; qv a split one; 48 px another; full its own
    assert engine.backbone_loads == 4
    for name in ("linear", "qkv", "qv", "full", "all", "linear", "axial"):
        model = adapters[name][1]
        patches = PATCHES[:, :1, :48, :48] if name == "axial" else PATCHES
        got = _probabilities(engine.score_patches(patches, adapter=name, tta=False))
        assert np.array_equal(got, _expected(model, patches)), name


def test_detach_and_reattach(tmp_path, engine):
    path_a, model_a = _adapter(tmp_path, "a", seed=1)
    path_l, model_l = _adapter(tmp_path, "lin", seed=2, mode="linear", lora=LoraSpec(targets="qkv"))
    path_q, model_q = _adapter(tmp_path, "q", seed=3, lora=LoraSpec(targets="qkv"))
    engine.attach_adapter(path_a)
    engine.attach_adapter(path_l)
    engine.attach_adapter(path_q)
    assert engine.detach_adapter("q") == ["a", "lin"]
    assert np.array_equal(_probabilities(engine.score_patches(PATCHES, "lin", tta=False)), _expected(model_l, PATCHES))
    engine.attach_adapter(path_q, name="q2")  # the shared backbone's peft wrapper takes a new adapter
    assert np.array_equal(_probabilities(engine.score_patches(PATCHES, "q2", tta=False)), _expected(model_q, PATCHES))
    assert engine.detach_adapter("a") == ["lin", "q2"] and engine.active == "q2"
    engine.detach_adapter("q2")
    assert engine.active == "lin"
    engine.attach_adapter(path_q, name="q2")
    with pytest.raises(AdapterError, match="not attached"):
        engine.score_patches(PATCHES, "a")
    engine.detach_adapter("lin")
    engine.detach_adapter("q2")
    assert engine.status()["backbone"] == [] and engine.active is None
    with pytest.raises(AdapterError, match="no adapter attached"):
        engine.score_patches(PATCHES)


def test_store_names_resolve(tmp_path, engine):
    path, _ = _adapter(tmp_path, "stored", seed=1)
    engine.store.import_(path)
    manifest = engine.attach_adapter("stored")
    assert manifest.name == "stored" and engine.active == "stored"
    with pytest.raises(AdapterError, match="neither"):
        engine.attach_adapter("not-there")


def test_cpu_scoring_is_deterministic_and_tta_averages_logits(tmp_path, engine):
    path, _ = _adapter(tmp_path, "a", seed=1, spec=SMALL)
    engine.attach_adapter(path)
    first = engine.score_patches(SMALL_PATCHES)
    assert engine.score_patches(SMALL_PATCHES.copy()) == first
    plain = np.array([r["logit"] for r in engine.score_patches(SMALL_PATCHES, tta=False)])
    tta = np.array([r["logit"] for r in first])
    assert not np.allclose(plain, tta)
    manual = np.mean([[r["logit"] for r in engine.score_patches(
        apply_tta(torch.from_numpy(SMALL_PATCHES), k, flip).numpy(), tta=False)] for k, flip in TTA_TRANSFORMS], axis=0)
    assert np.allclose(tta, manual, atol=1e-5)
    assert len({(k, f) for k, f in TTA_TRANSFORMS}) == 8


def test_tta_count_or_named_set_averages_exactly_those_variants(tmp_path, engine):
    path, _ = _adapter(tmp_path, "a", seed=1, spec=SMALL)
    engine.attach_adapter(path)

    def logits(tta):
        return np.array([r["logit"] for r in engine.score_patches(SMALL_PATCHES, tta=tta)])

    per_variant = {v: logits(False) if v == (0, False) else np.array([r["logit"] for r in engine.score_patches(
        apply_tta(torch.from_numpy(SMALL_PATCHES), *v).numpy(), tta=False)]) for v in TTA_TRANSFORMS}
    for name, variants in TTA_SETS.items():
        assert set(variants) <= set(TTA_TRANSFORMS) and len(set(variants)) == len(variants)
        expected = np.mean([per_variant[v] for v in variants], axis=0)
        assert np.allclose(logits(name), expected, atol=1e-5), name
    assert np.array_equal(logits(True), logits("d8")) and np.array_equal(logits(8), logits("d8"))
    assert np.array_equal(logits(False), logits("none")) and np.array_equal(logits(1), logits("none"))
    assert np.array_equal(logits(2), logits(TTA_BY_COUNT[2])) and np.array_equal(logits(4), logits(TTA_BY_COUNT[4]))
    assert resolve_tta(np.int64(2)) == TTA_BY_COUNT[2]
    for bad in (3, 0, "d4", None, 2.0, "D8"):
        with pytest.raises(TTAError, match="unknown test-time augmentation"):
            engine.score_patches(SMALL_PATCHES, tta=bad)
    with pytest.raises(TTAError):  # refused before any patch is cut
        engine.score(None, [Nodule((0.0, 0.0, 0.0))], tta="bad")


def test_temperature_threshold_and_labels(tmp_path, engine):
    path1, model = _adapter(tmp_path, "t1", seed=1, threshold=0.0, spec=SMALL)
    engine.attach_adapter(path1)
    manifest = engine.manifest("t1").to_dict()
    warm = tmp_path / "t2"
    save_adapter(model, AdapterManifest(**{**manifest, "name": "t2", "temperature": 2.0, "threshold": 1.0}), warm)
    engine.attach_adapter(warm)
    one = engine.score_patches(SMALL_PATCHES, "t1", tta=False)
    two = engine.score_patches(SMALL_PATCHES, "t2", tta=False)
    assert np.allclose([r["logit"] / 2 for r in one], [r["logit"] for r in two], atol=1e-12)
    assert np.array_equal(_probabilities(two), _expected(model, SMALL_PATCHES, temperature=2.0))
    assert {r["label"] for r in one} == {"malignant"} and {r["label"] for r in two} == {"benign"}


def test_random_init_is_flagged_in_every_result(tmp_path, engine):
    path, _ = _adapter(tmp_path, "rnd", seed=1, spec=SMALL)
    weights = tmp_path / "tiny.safetensors"
    vit, _ = create_backbone("medlora_tiny", allow_random_init=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    real, _ = _adapter(tmp_path, "real", seed=2, weights=weights, spec=SMALL)
    engine.attach_adapter(path)
    assert all(r["random_init"] is True for r in engine.score_patches(SMALL_PATCHES))
    with pytest.raises(AdapterError, match="cannot load its backbone.*weights"):
        engine.attach_adapter(real)  # the weights file is needed and not given
    engine.attach_adapter(real, weights=weights)
    assert all(r["random_init"] is False for r in engine.score_patches(SMALL_PATCHES, "real"))
    assert engine.backbone_loads == 2  # random and pretrained backbones are never mixed


def test_bad_patches_are_refused(tmp_path, engine):
    engine.attach_adapter(_adapter(tmp_path, "a", seed=1)[0])
    with pytest.raises(PatchError, match=r"reads \(N, 9, 64, 64\)"):
        engine.score_patches(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(PatchError, match="shape"):
        engine.score_patches(np.zeros((9, 64, 64), np.float32))
    bad = PATCHES.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(PatchError, match="NaN"):
        engine.score_patches(bad)
    assert engine.score_patches(np.zeros((0, 9, 64, 64), np.float32)) == []


def test_score_cuts_patches_from_a_ct(tmp_path, engine):
    spec = PatchSpec(views="ortho3", pixels=32, fov_mm=40.0)
    path, model = _adapter(tmp_path, "ct", seed=1, spec=spec)
    engine.attach_adapter(path)
    voxels = np.full((40, 64, 64), -800.0, dtype=np.float32)
    zz, yy, xx = np.mgrid[:40, :64, :64]
    voxels[(zz - 20) ** 2 + ((yy - 30) / 1.5) ** 2 + (xx - 34) ** 2 < 36] = 40.0
    geometry = Geometry(size=(64, 64, 40), spacing=(0.8, 0.8, 1.5), origin_lps=(-20.0, 10.0, -100.0),
                        direction=np.diag([1.0, -1.0, 1.0]))
    image = CTImage(voxels, geometry)
    centre = geometry.ijk_to_lps(np.array([[34.0, 30.0, 20.0]]))[0]
    nodules = [Nodule(centre_lps=tuple(centre), nodule_id="n1", case_id="c1"),
               Nodule(centre_lps=tuple(centre + 5.0), nodule_id="n2", case_id="c1")]
    results = engine.score(image, nodules, tta=False)
    assert [r["nodule_id"] for r in results] == ["n1", "n2"]
    assert results[0]["centre_lps"] == pytest.approx(list(centre))
    patches = extract_patches(image, np.array([n.centre_lps for n in nodules]), spec)
    assert np.array_equal(_probabilities(results), _expected(model, patches))
    outside = [Nodule(centre_lps=(500.0, 500.0, 500.0), nodule_id="far")]
    with pytest.raises(PatchError, match="outside the CT"):
        engine.score(image, outside)


def test_out_of_memory_halves_the_batch_then_falls_back_to_cpu(tmp_path, engine, monkeypatch):
    path, model = _adapter(tmp_path, "a", seed=1, spec=SMALL)
    engine.attach_adapter(path)
    attached = engine._adapters["a"]
    real = attached.model.view_logits
    sizes = []

    def limited(patches):
        sizes.append(patches.shape[0])
        if patches.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated: no GPU on this machine)")
        return real(patches)

    monkeypatch.setattr(attached.model, "view_logits", limited)
    results = engine.score_patches(SMALL_PATCHES, tta=False)
    assert sizes[0] == 3 and max(sizes[1:]) <= 2
    assert np.allclose(_probabilities(results), _expected(model, SMALL_PATCHES), atol=1e-6)

    def always(patches):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(attached.model, "view_logits", always)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # on the CPU already: nothing left to fall back to
        engine.score_patches(SMALL_PATCHES, tta=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_out_of_memory_for_one_nodule_falls_back_to_cpu(tmp_path, monkeypatch):
    engine = ScoringEngine(device="cuda")
    path, model = _adapter(tmp_path, "a", seed=1, spec=SMALL)
    engine.attach_adapter(path)
    attached = engine._adapters["a"]
    real = attached.model.view_logits

    def oom_on_cuda(patches):
        if patches.is_cuda:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(patches)

    monkeypatch.setattr(attached.model, "view_logits", oom_on_cuda)
    with pytest.warns(RuntimeWarning, match="continues on the CPU"):
        results = engine.score_patches(SMALL_PATCHES, tta=False)
    assert engine.device.type == "cpu"
    assert np.allclose(_probabilities(results), _expected(model.cpu(), SMALL_PATCHES), atol=1e-6)


def test_backbone_loaded_ahead_is_shared_by_the_adapters_attached_later(tmp_path, engine):
    path, model = _adapter(tmp_path, "early", seed=3, spec=SMALL)
    info = engine.load_backbone("medlora_tiny", pixels=SMALL.pixels, allow_random_init=True)
    assert info["random_init"] and info["img_size"] == SMALL.pixels and engine.backbone_loads == 1
    engine.attach_adapter(path)
    assert engine.backbone_loads == 1  # the adapter found the backbone already there
    assert np.array_equal(_probabilities(engine.score_patches(SMALL_PATCHES, tta=False)),
                          _expected(model, SMALL_PATCHES))
