"""Backbones, LoRA placement and the nodule classifier (medlora_tiny, random init)."""

from __future__ import annotations

import time

import pytest
import torch

from MedLoRALib.device import choose_device
from MedLoRALib.errors import ModelError
from MedLoRALib.models import LoraSpec, build_model, create_backbone, split_qkv, trainable_parameter_count
from MedLoRALib.models.backbones import get_backbone_config, list_backbones
from MedLoRALib.models.lora import SplitQKV, target_module_names
from MedLoRALib.patches import PatchSpec

torch.set_num_threads(1)  # a busy 2-core CI machine: more threads only contend
SPEC9 = PatchSpec(views="multiview9", pixels=64)
TINY = get_backbone_config("medlora_tiny")
TINY_DEPTH = TINY.timm_kwargs["depth"]


def _tiny(**kwargs):
    return build_model("medlora_tiny", patch_spec=kwargs.pop("patch_spec", SPEC9), allow_random_init=True, **kwargs)


def test_registry_names():
    names = list_backbones()
    for name in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "medlora_tiny"):
        assert name in names
    assert get_backbone_config("dinov2_vits14").timm_name == "vit_small_patch14_dinov2.lvd142m"
    cfg = get_backbone_config("timm:vit_base_patch16_224.augreg_in21k")
    assert (cfg.patch_size, cfg.embed_dim) == (16, 768)
    assert get_backbone_config("vit_base_patch16_224").name == "timm:vit_base_patch16_224"


def test_unknown_and_non_vit_backbones_are_refused():
    with pytest.raises(ModelError, match="unknown backbone"):
        get_backbone_config("no_such_model_xyz")
    with pytest.raises(ModelError, match="not a Vision Transformer"):
        get_backbone_config("resnet18")


@pytest.mark.parametrize("name", ["dinov2_vits14", "medlora_tiny"])
def test_no_weights_fails_fast_with_instructions(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError) as info:
        create_backbone(name)
    assert time.perf_counter() - start < 5.0  # no hub retries
    message = str(info.value)
    assert "weights" in message and "allow_random_init" in message and name in message
    if name == "dinov2_vits14":
        assert "timm/vit_small_patch14_dinov2.lvd142m" in message


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        create_backbone("medlora_tiny", weights=tmp_path / "nope.safetensors")


def test_split_qkv_keeps_outputs():
    vit, _ = create_backbone("medlora_tiny", allow_random_init=True)
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        before = vit(images)
        split_qkv(vit)
        after = vit(images)
    assert all(isinstance(block.attn.qkv, SplitQKV) for block in vit.blocks)
    assert (before - after).abs().max().item() < 1e-5
    assert before.abs().max().item() > 0.1  # a real output, not zeros


def test_random_init_is_reproducible():
    _, a = create_backbone("medlora_tiny", allow_random_init=True)
    _, b = create_backbone("medlora_tiny", allow_random_init=True)
    assert a.random_init and a.weights_sha256 is None
    assert a.random_init_fingerprint == b.random_init_fingerprint


def test_local_weights_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file

    source, _ = create_backbone("medlora_tiny", allow_random_init=True)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    st_file = tmp_path / "tiny.safetensors"
    save_file(state, str(st_file))
    vit, info = create_backbone("medlora_tiny", weights=st_file)
    assert not info.random_init and len(info.weights_sha256) == 64
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in state.items())

    pth = tmp_path / "tiny.pth"
    torch.save({"state_dict": state}, pth)
    vit2, info2 = create_backbone("medlora_tiny", weights=pth)
    assert torch.equal(vit2.pos_embed, source.pos_embed) and info2.weights_sha256 != info.weights_sha256

    # another input size: timm resamples the position embedding (8x8 grid -> 12x12)
    vit3, info3 = create_backbone("medlora_tiny", weights=st_file, img_size=96)
    assert info3.img_size == 96 and vit3.pos_embed.shape[1] == 1 + 12 * 12
    assert vit3(torch.rand(1, 3, 96, 96)).shape == (1, TINY.embed_dim)


def test_weights_that_need_unpickling_or_do_not_fit_are_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": object.__new__(LoraSpec)}, evil)
    with pytest.raises(ModelError, match="cannot read backbone weights"):
        create_backbone("medlora_tiny", weights=evil)
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"pos_embed": torch.zeros(1, 5, 7)}, str(wrong))
    with pytest.raises(ModelError):
        create_backbone("medlora_tiny", weights=wrong)


def _lora_formula(spec: LoraSpec, dim: int, hidden: int, depth: int) -> int:
    r = spec.rank
    per_block = {
        "qv": 2 * r * (dim + dim),
        "qkv": r * (dim + 3 * dim),
        "attn": r * (dim + 3 * dim) + r * (dim + dim),
        "all": r * (dim + 3 * dim) + r * (dim + dim) + r * (dim + hidden) + r * (hidden + dim),
    }[spec.targets]
    blocks = depth if spec.last_n_blocks is None else spec.last_n_blocks
    return blocks * per_block + (dim + 1) + 2 * dim  # + head + final LayerNorm


@pytest.mark.parametrize("targets", ["qv", "qkv", "attn", "all"])
@pytest.mark.parametrize("last_n", [None, 2])
def test_trainable_counts_match_formula(targets, last_n):
    spec = LoraSpec(rank=4, targets=targets, last_n_blocks=last_n)
    model, info = _tiny(lora=spec)
    trainable, total = trainable_parameter_count(model)
    hidden = model.vit.blocks[0].mlp.fc1.out_features
    assert trainable == _lora_formula(spec, info.embed_dim, hidden, info.depth)
    assert total > trainable
    adapted = {name.split(".attn")[0].split(".mlp")[0] for name in target_module_names(model.vit, spec)}
    assert len(adapted) == (last_n or info.depth)


def test_baseline_mode_counts():
    full, info = _tiny(mode="full")
    linear, _ = _tiny(mode="linear")
    trainable_full, total_full = trainable_parameter_count(full)
    assert trainable_full == total_full
    assert trainable_parameter_count(linear) == (info.embed_dim + 1, total_full)


def test_vit_s14_r8_qv_count():
    model, info = build_model("dinov2_vits14", patch_spec=PatchSpec(views="ortho3", pixels=64),
                              lora=LoraSpec(rank=8, targets="qv"), allow_random_init=True)
    trainable, total = trainable_parameter_count(model)
    assert trainable == _lora_formula(LoraSpec(rank=8), 384, 1536, 12) == 148_609
    print(f"\nViT-S/14 r=8 qv: {trainable} trainable of {total} ({100 * trainable / total:.2f}%)")
    # 64 px is not a multiple of 14: timm pads to 70 px, a 5x5 grid
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2,)
    assert model.vit.pos_embed.shape[1] == 1 + 5 * 5


@pytest.mark.parametrize("mode", ["lora", "full", "linear"])
def test_training_step_moves_only_trainable(mode):
    model, _ = _tiny(mode=mode, lora=LoraSpec(rank=4, dropout=0.0))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    patches, labels = torch.rand(4, 9, 64, 64), torch.tensor([0.0, 1.0, 0.0, 1.0])
    for _ in range(2):  # LoRA B starts at zero: A only gets a gradient on the second step
        optimiser.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(patches), labels).backward()
        optimiser.step()
    for name, param in model.named_parameters():
        moved = not torch.equal(before[name], param.detach())
        assert moved == param.requires_grad, f"{mode}: {name} moved={moved} trainable={param.requires_grad}"
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if mode == "lora":
        assert any("lora_A" in n for n in names) and "head.weight" in names and "norm.weight" in names
        assert not any("qkv.k." in n and "lora" in n for n in names)  # q and v only


def test_last_n_blocks_runs_frozen_blocks_without_autograd():
    spec = LoraSpec(rank=4, dropout=0.0, last_n_blocks=2)
    model, info = _tiny(lora=spec, patch_spec=PatchSpec(views="ortho3", pixels=64))
    assert model.frozen_blocks == info.depth - 2
    lora_blocks = {int(n.split(".")[4]) for n, _ in model.named_parameters() if "lora_" in n}
    assert lora_blocks == {info.depth - 2, info.depth - 1}
    patches = torch.rand(3, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        reference = model(patches)
    model.train()  # dropout 0 and no drop-path: training forward equals inference
    captured = {}

    def record(module, inputs, output):
        captured["requires_grad"] = output.requires_grad

    handle = model.vit.blocks[model.frozen_blocks - 1].register_forward_hook(record)
    out = model(patches)
    handle.remove()
    assert torch.allclose(out, reference, atol=1e-6)
    assert captured["requires_grad"] is False
    out.sum().backward()
    assert model.vit.patch_embed.proj.weight.grad is None


def test_view_sets_map_to_images():
    for views, n_views in (("multiview9", 9), ("ortho3", 1), ("axial", 1)):
        spec = PatchSpec(views=views, pixels=64)
        model, _ = _tiny(patch_spec=spec, mode="linear")
        model.eval()
        with torch.no_grad():
            assert model.view_logits(torch.rand(2, *spec.shape)).shape == (2, n_views)
            assert model(torch.rand(2, *spec.shape)).shape == (2,)
        with pytest.raises(ModelError, match="patches must be"):
            model(torch.rand(2, 5, 64, 64))
    with pytest.raises(ModelError, match="cube"):
        _tiny(patch_spec=PatchSpec(views="cube", pixels=16))


def test_multiview9_fuses_mean_of_per_view_logits():
    model, _ = _tiny(mode="linear")
    model.eval()
    patches = torch.rand(2, 9, 64, 64)
    with torch.no_grad():
        per_view = model.view_logits(patches)
        assert torch.allclose(model(patches), per_view.mean(dim=1))
        # each view is scored on its own plane: changing one plane changes only its logit
        changed = patches.clone()
        changed[:, 4] = 1.0 - changed[:, 4]
        delta = (model.view_logits(changed) - per_view).abs() > 1e-6
    assert delta[:, 4].all() and not delta[:, [0, 1, 2, 3, 5, 6, 7, 8]].any()


def test_timm_name_backbone():
    vit, info = create_backbone("timm:vit_tiny_patch16_224", allow_random_init=True, img_size=32)
    assert info.name == "timm:vit_tiny_patch16_224" and info.patch_size == 16 and info.img_size == 32
    assert vit(torch.rand(1, 3, 32, 32)).shape == (1, 192)


def test_choose_device(monkeypatch):
    monkeypatch.delenv("MEDLORA_DEVICE", raising=False)
    assert choose_device("cpu").type == "cpu"
    monkeypatch.setenv("MEDLORA_DEVICE", "cpu")
    assert choose_device().type == "cpu"
    with pytest.raises(ModelError, match="unknown device"):
        choose_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="not available"):
            choose_device("cuda")
        monkeypatch.setenv("MEDLORA_DEVICE", "cuda")
        with pytest.raises(ModelError, match="MEDLORA_DEVICE"):
            choose_device()


def test_weights_source_is_the_one_lookup_of_recorded_backbone_weights(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from MedLoRALib.atomic import sha256_file
    from MedLoRALib.models.backbones import RANDOM_INIT, weights_source

    assert weights_source(RANDOM_INIT) == {"weights": None, "pretrained": False, "allow_random_init": True}
    vit, _ = create_backbone("medlora_tiny", allow_random_init=True)
    (tmp_path / "weights").mkdir()
    path = tmp_path / "weights" / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    digest = sha256_file(path)
    assert weights_source(digest)["weights"] is None  # not found: create_backbone then explains
    monkeypatch.setenv("MEDLORA_HOME", str(tmp_path))
    assert weights_source(digest) == {"weights": path, "pretrained": True, "allow_random_init": False}
    given = tmp_path / "given.safetensors"
    assert weights_source(digest, given)["weights"] == given  # a file named by the user wins
    _, info = create_backbone("medlora_tiny", **weights_source(digest))
    assert info.weights_sha256 == digest and info.identity == digest


def test_patches_smaller_than_one_vit_patch_are_refused():
    # 7 px on an 8-px-patch ViT would be one padded token: no image left to classify
    with pytest.raises(ModelError, match="smaller than medlora_tiny's 8-pixel ViT patch"):
        create_backbone("medlora_tiny", allow_random_init=True, img_size=7)
    vit, info = create_backbone("medlora_tiny", allow_random_init=True, img_size=12)  # padded, still accepted
    assert info.img_size == 12
