"""Adapter packages (save/load, integrity, compatibility) and the adapter store."""

from __future__ import annotations

import json
import sys
import zipfile

import pytest
import torch
from helpers import assert_imports_without, tiny_model
from safetensors.torch import save_file

from MedLoRALib.adapters import AdapterManifest, read_manifest
from MedLoRALib.adapters import manifest as manifest_module
from MedLoRALib.adapters.package import HEAD_WEIGHTS, LORA_WEIGHTS, load_adapter, save_adapter
from MedLoRALib.adapters.store import AdapterStore, default_store_root, resolve_adapter
from MedLoRALib.errors import AdapterError
from MedLoRALib.models import LoraSpec, build_model, create_backbone
from MedLoRALib.patches import PatchSpec

torch.set_num_threads(1)  # a busy 2-core CI machine: more threads only contend
SPEC = PatchSpec(views="multiview9", pixels=64)
PATCHES = torch.rand(3, 9, 64, 64, generator=torch.Generator().manual_seed(1))


def _tiny(mode="lora", **kwargs):
    return tiny_model(SPEC, mode=mode, **kwargs)


@pytest.fixture
def weights_files(tmp_path):
    """Two different medlora_tiny weight files (as a pretrained backbone would be)."""
    files = []
    for offset in (0.0, 0.01):
        vit, _ = create_backbone("medlora_tiny", allow_random_init=True)
        path = tmp_path / f"tiny_{len(files)}.safetensors"
        save_file({k: (v + offset).contiguous() for k, v in vit.state_dict().items()}, str(path))
        files.append(path)
    return files


@pytest.mark.parametrize("mode", ["lora", "full", "linear"])
@pytest.mark.parametrize("suffix", ["", ".zip"])
def test_round_trip_is_bit_identical(tmp_path, mode, suffix):
    model = _tiny(mode)
    assert model.head.bias.abs().item() > 0  # the head bias is part of what must survive
    with torch.no_grad():
        expected = model(PATCHES)
    path = save_adapter(model, AdapterManifest(name="nodules", threshold=0.4, metrics={"auc": 0.8}),
                        tmp_path / f"adapter{suffix}")
    loaded, manifest = load_adapter(path)
    with torch.no_grad():
        assert torch.equal(loaded(PATCHES), expected)
    assert torch.equal(loaded.head.bias, model.head.bias)
    assert manifest.name == "nodules" and manifest.mode == mode and manifest.threshold == 0.4
    assert manifest.random_init and manifest.backbone_sha256 == "random-init"
    assert manifest.spec == SPEC and manifest.metrics == {"auc": 0.8}


@pytest.mark.parametrize("spec", [LoraSpec(rank=4, use_dora=True), LoraSpec(rank=4, use_rslora=True, targets="all")])
def test_dora_and_rslora_round_trip(tmp_path, spec):
    model = _tiny(lora=spec)
    with torch.no_grad():
        expected = model(PATCHES)
    loaded, manifest = load_adapter(save_adapter(model, AdapterManifest(name="variant"), tmp_path / "variant"))
    with torch.no_grad():
        assert torch.equal(loaded(PATCHES), expected)
    assert LoraSpec.from_dict(manifest.lora) == spec


def test_lora_adapter_uses_peft_format_and_is_small(tmp_path):
    model = _tiny(lora=LoraSpec(rank=8, targets="qv"))
    path = save_adapter(model, AdapterManifest(name="small"), tmp_path / "small")
    config = json.loads((path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and "blocks.0.attn.qkv.q" in config["target_modules"]
    manifest = read_manifest(path)
    assert set(manifest.files) == {LORA_WEIGHTS, "lora/adapter_config.json", HEAD_WEIGHTS}
    assert manifest.lora["targets"] == "qv" and manifest.backbone == "medlora_tiny"
    assert (path / LORA_WEIGHTS).stat().st_size < 200_000


def test_saved_with_real_weights_checks_backbone_hash(tmp_path, weights_files):
    first, second = weights_files
    model = tiny_model(SPEC, weights=first)
    info = model.backbone_info
    path = save_adapter(model, AdapterManifest(name="site-a"), tmp_path / "site-a")
    manifest = read_manifest(path)
    assert not manifest.random_init and manifest.backbone_sha256 == info.weights_sha256
    loaded, _ = load_adapter(path, weights=first)
    with torch.no_grad():
        assert torch.equal(loaded(PATCHES), model(PATCHES))
    with pytest.raises(AdapterError, match="same backbone weights file"):
        load_adapter(path, weights=second)
    with pytest.raises(AdapterError, match="cannot build its backbone.*weights"):
        load_adapter(path)  # no weights available at all


def test_random_init_adapter_refused_on_pretrained_model_and_when_disallowed(tmp_path, weights_files):
    path = save_adapter(_tiny(), AdapterManifest(name="rnd"), tmp_path / "rnd")
    with pytest.raises(AdapterError, match="randomly initialised"):
        load_adapter(path, allow_random_init=False)
    pretrained, _ = build_model("medlora_tiny", patch_spec=SPEC, weights=weights_files[0])
    with pytest.raises(AdapterError, match="randomly initialised"):
        load_adapter(path, model=pretrained)


def test_mismatched_model_is_refused(tmp_path):
    path = save_adapter(_tiny(lora=LoraSpec(rank=4)), AdapterManifest(name="r4"), tmp_path / "r4")
    other_rank = _tiny(lora=LoraSpec(rank=8))
    with pytest.raises(AdapterError, match="LoRA"):
        load_adapter(path, model=other_rank)
    other_spec, _ = build_model("medlora_tiny", patch_spec=PatchSpec(views="axial", pixels=64),
                                lora=LoraSpec(rank=4), allow_random_init=True)
    with pytest.raises(AdapterError, match="reads"):
        load_adapter(path, model=other_spec)
    other_backbone, _ = build_model("timm:vit_tiny_patch16_224", patch_spec=SPEC, allow_random_init=True,
                                    lora=LoraSpec(rank=4))
    with pytest.raises(AdapterError, match="trained on backbone 'medlora_tiny'"):
        load_adapter(path, model=other_backbone)


def _flip_one_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]


def test_tampered_files_are_refused(tmp_path):
    path = save_adapter(_tiny(), AdapterManifest(name="t"), tmp_path / "t")
    target = path / HEAD_WEIGHTS
    target.write_bytes(_flip_one_byte(target.read_bytes()))
    with pytest.raises(AdapterError, match=r"head.safetensors does not match the SHA-256"):
        load_adapter(path)

    zipped = save_adapter(_tiny(), AdapterManifest(name="z"), tmp_path / "z.zip")
    with zipfile.ZipFile(zipped) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members[LORA_WEIGHTS] = _flip_one_byte(members[LORA_WEIGHTS])
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(tampered, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(AdapterError, match="does not match the SHA-256"):
        load_adapter(tampered)

    (path / HEAD_WEIGHTS).unlink()
    with pytest.raises(AdapterError, match="incomplete"):
        load_adapter(path)


def test_newer_format_and_broken_manifests_are_refused(tmp_path):
    path = save_adapter(_tiny(), AdapterManifest(name="n"), tmp_path / "n")
    manifest_file = path / "manifest.json"
    data = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**data, "format_version": 99, "medlora_version": "9.0"}))
    with pytest.raises(AdapterError, match="newer MedLoRA.*Upgrade"):
        load_adapter(path)
    manifest_file.write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_manifest(path)
    manifest_file.write_text(json.dumps({**data, "threshold": 3, "mode": "weird"}))
    with pytest.raises(AdapterError, match="threshold.*mode|mode.*threshold"):
        read_manifest(path)
    with pytest.raises(AdapterError, match="no adapter at"):
        read_manifest(tmp_path / "missing")


def test_save_is_atomic(tmp_path, monkeypatch):
    first = save_adapter(_tiny(), AdapterManifest(name="a", description="old"), tmp_path / "a")
    before = {p.name: p.read_bytes() for p in first.rglob("*") if p.is_file()}

    def broken(self):
        raise OSError("disk full")

    monkeypatch.setattr(manifest_module.AdapterManifest, "to_json", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(_tiny(lora=LoraSpec(rank=2)), AdapterManifest(name="a"), tmp_path / "a")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary leftovers
    replaced = save_adapter(_tiny(lora=LoraSpec(rank=2)), AdapterManifest(name="a"), tmp_path / "a")
    assert read_manifest(replaced).lora["rank"] == 2


def test_store_lifecycle(tmp_path):
    store = AdapterStore(tmp_path / "store")
    assert store.list() == []
    source = save_adapter(_tiny(), AdapterManifest(name="site-a"), tmp_path / "site-a.zip")
    assert store.import_(source) == "site-a"
    assert store.import_(source, name="site-b") == "site-b"
    with pytest.raises(AdapterError, match="already exists"):
        store.import_(source)
    assert [m.name for m in store.list()] == ["site-a", "site-b"]
    assert store.info("site-b").name == "site-b"

    exported = store.export("site-b", tmp_path / "out" / "b.zip")
    assert zipfile.is_zipfile(exported) and read_manifest(exported).name == "site-b"
    folder = store.export("site-b", tmp_path)  # an existing folder: written inside it
    assert folder == tmp_path / "site-b" and read_manifest(folder).name == "site-b"

    store.rename("site-b", "site-c")
    assert store.names() == ["site-a", "site-c"] and store.info("site-c").name == "site-c"
    loaded, manifest = load_adapter(store.path("site-c"))
    assert manifest.name == "site-c"
    store.delete("site-a")
    assert store.names() == ["site-c"]
    with pytest.raises(AdapterError, match="no adapter named 'site-a'.*site-c"):
        store.info("site-a")
    with pytest.raises(AdapterError, match="invalid adapter name"):
        store.rename("site-c", "../evil")
    assert resolve_adapter("site-c", store) == store.path("site-c")
    assert resolve_adapter(exported, store) == exported
    with pytest.raises(AdapterError, match="neither"):
        resolve_adapter("nothing-here", store)


def test_store_refuses_tampered_import_and_skips_broken_entries(tmp_path):
    store = AdapterStore(tmp_path / "store")
    source = save_adapter(_tiny(), AdapterManifest(name="x"), tmp_path / "x")
    (source / HEAD_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="SHA-256"):
        store.import_(source)
    assert store.names() == []
    broken = store.root / "broken"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("[]")
    assert store.list() == []


def test_default_store_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDLORA_HOME", str(tmp_path / "home"))
    assert default_store_root() == tmp_path / "home" / "adapters"
    monkeypatch.delenv("MEDLORA_HOME")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        assert AdapterStore().root == tmp_path / "xdg" / "medlora" / "adapters"


def test_manifest_and_store_do_not_import_torch():
    assert_imports_without(["MedLoRALib.adapters", "MedLoRALib.adapters.store", "MedLoRALib.adapters.manifest",
                            "MedLoRALib.cli.adapters"], forbidden=("torch",))


def test_backbone_weights_found_by_hash_in_medlora_home(tmp_path, weights_files, monkeypatch):
    from MedLoRALib.engine import ScoringEngine

    first, second = weights_files
    model = tiny_model(SPEC, weights=first)
    path = save_adapter(model, AdapterManifest(name="site-a"), tmp_path / "site-a")
    home = tmp_path / "home"
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "decoy.safetensors").write_bytes(second.read_bytes())
    monkeypatch.setenv("MEDLORA_HOME", str(home))
    with pytest.raises(AdapterError, match="cannot build its backbone"):
        load_adapter(path)  # only a file with other weights is there
    (home / "weights" / "backbone.safetensors").write_bytes(first.read_bytes())
    loaded, _ = load_adapter(path)
    with torch.no_grad():
        assert torch.equal(loaded(PATCHES), model(PATCHES))
    engine = ScoringEngine(device="cpu", store=AdapterStore(tmp_path / "store"))
    engine.attach_adapter(path)  # no weights given: found by the manifest's SHA-256
    assert engine.score_patches(PATCHES.numpy(), tta=False)[0]["random_init"] is False


def test_store_option_before_or_after_the_action(tmp_path, capsys):
    from MedLoRALib.cli import main

    for argv in (["adapters", "--store", str(tmp_path / "a"), "list"], ["adapters", "list", "--store", str(tmp_path / "b")],
                 ["adapters", "--store", str(tmp_path / "x"), "list", "--store", str(tmp_path / "c")]):
        assert main(argv) == 0
        assert f"no adapters in {argv[-1] if argv[-1] != 'list' else argv[2]}" in capsys.readouterr().out
