"""The synthetic-CT pre-training of the tiny backbone, and the weights shipped from it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_imports_without

from MedLoRALib.errors import MedLoRAError
from MedLoRALib.training.pretrain import (
    DEFAULT_WEIGHTS,
    STRUCTURES,
    PretrainConfig,
    main,
    patch_specs,
    pretrain,
    synthetic_batch,
    synthetic_pairs,
    synthetic_patch,
)

ROOT = Path(__file__).resolve().parents[1]


def test_scene_module_is_torch_free():
    assert_imports_without(["MedLoRALib.training.pretrain", "MedLoRALib.synthetic.scenes"], forbidden=("torch",))


def test_batches_are_seeded_balanced_and_normalised():
    images, labels = synthetic_batch(seed=3, stream=2, index=5, size=12, pixels=32)
    again, labels_again = synthetic_batch(seed=3, stream=2, index=5, size=12, pixels=32)
    other, _ = synthetic_batch(seed=3, stream=2, index=6, size=12, pixels=32)
    assert images.shape == (12, 3, 32, 32) and images.dtype == np.float32
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert not np.array_equal(images, other)
    assert np.bincount(labels, minlength=len(STRUCTURES)).tolist() == [2] * len(STRUCTURES)
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_same_seed_gives_the_recorded_patches():
    """The scenes the shipped backbone was pre-trained on must not change when their code moves.

    Digests (patches rounded to 1e-3) computed with the code on main before the ``synthetic/`` split.
    """
    images, labels = synthetic_batch(3, 2, 5, 12, 16)
    assert hashlib.sha256(np.round(images, 3).tobytes() + labels.tobytes()).hexdigest() == (
        "e18fb1f066e3af079c05bd715ecdb5390f22c051eccbad92b08057cbcb77e56e")
    pairs, labels = synthetic_pairs(1, 2, 0, 6, 16)
    assert hashlib.sha256(np.round(pairs, 3).tobytes() + labels.tobytes()).hexdigest() == (
        "2cf8f198ae910ec9643deb61e80992753210488d74be75ec0b632970178f846a")


def test_structures_are_where_the_label_says():
    """Solid structures at the centre are brighter (denser) there than bare parenchyma."""
    grey, ortho3 = patch_specs(fov_mm=50.0, pixels=32)
    rng = np.random.default_rng(0)

    def centre_value(structure: int) -> float:
        patch = synthetic_patch(rng, structure, grey)
        return float(patch[0, 14:18, 14:18].mean())

    parenchyma = np.median([centre_value(STRUCTURES.index("parenchyma")) for _ in range(20)])
    vessel = np.median([centre_value(STRUCTURES.index("vessel")) for _ in range(20)])
    nodule = np.median([centre_value(STRUCTURES.index("nodule")) for _ in range(20)])
    assert parenchyma < 0.15  # lung: about -850 HU in a -1000…400 window
    assert vessel > parenchyma + 0.3 and nodule > parenchyma + 0.2
    assert synthetic_patch(rng, 0, ortho3).shape == (3, 32, 32)


def test_pairs_show_one_scene_from_two_angles():
    pairs, labels = synthetic_pairs(seed=1, stream=2, index=0, size=12, pixels=32)
    assert pairs.shape == (2, 12, 3, 32, 32) and labels.shape == (12,)
    assert all(not np.array_equal(pairs[0, i], pairs[1, i]) for i in range(12))
    # Every view's centre samples the scene's centre, whatever the rotation: partners agree there.
    centre = pairs[:, :, 0, 15:17, 15:17].mean(axis=(-1, -2))
    within = np.abs(centre[0] - centre[1]).mean()
    across = np.abs(centre[0][:, None] - centre[1][None, :])[~np.eye(12, dtype=bool)].mean()
    assert within < 0.5 * across


def test_contrastive_objective_runs_and_is_recorded(tmp_path):
    import torch

    torch.set_num_threads(1)
    config = PretrainConfig(steps=1, batch_size=3, val_size=6, threads=1, contrastive_weight=1.0)
    record = pretrain(config, tmp_path / "ssl.safetensors", command="test", log_every=0)
    assert "NT-Xent" in record["pretext_task"]["objective"]
    assert record["pretext_task"]["train_patches"] == 6 and record["config"]["contrastive_weight"] == 1.0
    assert (tmp_path / "ssl.json").is_file()


def test_same_run_writes_the_same_bytes(tmp_path):
    """Same seed, same file: the SHA-256 in the record identifies the weights, not the run."""
    import torch

    torch.set_num_threads(1)
    config = PretrainConfig(steps=1, batch_size=4, val_size=6, threads=1)
    first = pretrain(config, tmp_path / "a.safetensors", log_every=0)
    second = pretrain(config, tmp_path / "b.safetensors", log_every=0)
    assert first["sha256"] == second["sha256"]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(MedLoRAError, match="steps must be ≥ 1"):
        PretrainConfig(steps=0)
    with pytest.raises(MedLoRAError, match="storage_dtype"):
        PretrainConfig(storage_dtype="int8")


def test_pixels_must_be_whole_vit_patches(tmp_path):
    out = tmp_path / "never.safetensors"
    with pytest.raises(MedLoRAError, match="multiple of its 14-pixel ViT patch.*--pixels 28"):
        pretrain(PretrainConfig(backbone="dinov2_vits14", pixels=30, steps=1, batch_size=2, val_size=2), out)
    with pytest.raises(MedLoRAError, match="pixels must be ≥ 0"):
        PretrainConfig(pixels=-1)
    assert not out.exists()


def test_vits14_pretrains_at_a_chosen_size_and_loads_as_weights(tmp_path, capsys):
    """``--backbone dinov2_vits14 --pixels 28``: 2×2 patch tokens, and the file loads as --weights at 28 px."""
    import torch
    from safetensors.torch import load_file

    from MedLoRALib.models import create_backbone

    out = tmp_path / "vits.safetensors"
    assert main(["--backbone", "dinov2_vits14", "--pixels", "28", "--steps", "1", "--batch-size", "2",
                 "--val-size", "6", "--threads", "1", "--log-every", "0", "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sha256"] == record["sha256"]
    assert record["backbone"] == "dinov2_vits14" and record["config"]["pixels"] == 28
    assert record["architecture"]["img_size"] == record["pretext_task"]["patch"]["pixels"] == 28
    saved = load_file(str(out))
    assert saved["pos_embed"].shape == (1, 1 + 2 * 2, 384)
    vit, info = create_backbone("dinov2_vits14", weights=out, img_size=28)
    assert not info.random_init and info.weights_sha256 == record["sha256"] and info.depth == 12
    loaded = vit.state_dict()
    assert set(saved) == set(loaded)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor.float()), key


def test_shipped_weights_match_their_record_and_load():
    import torch
    from safetensors.torch import load_file

    from MedLoRALib.adapters.manifest import sha256_file
    from MedLoRALib.models import create_backbone

    record = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert record["file"] == DEFAULT_WEIGHTS.name
    assert sha256_file(DEFAULT_WEIGHTS) == record["sha256"]
    assert DEFAULT_WEIGHTS.stat().st_size == record["size_bytes"] < 3_000_000
    vit, info = create_backbone("medlora_tiny", weights=DEFAULT_WEIGHTS)
    assert not info.random_init and info.weights_sha256 == record["sha256"]
    shipped = load_file(str(DEFAULT_WEIGHTS))
    loaded = vit.state_dict()
    assert set(shipped) == set(loaded)
    for key, tensor in shipped.items():  # float16 → float32 is exact
        assert torch.equal(loaded[key], tensor.float()), key


@pytest.mark.slow
def test_shipped_backbone_features_know_the_structures():
    """A linear probe on the shipped backbone's features names structures far better than on random init."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from MedLoRALib.models import create_backbone

    torch.set_num_threads(1)
    images, labels = synthetic_batch(seed=123, stream=9, index=0, size=240, pixels=64)
    scores = {}
    for name, kwargs in (("shipped", {"weights": DEFAULT_WEIGHTS}),
                         ("random", {"allow_random_init": True, "pretrained": False})):
        vit, _ = create_backbone("medlora_tiny", **kwargs)
        with torch.no_grad():
            features = vit(torch.from_numpy(images)).numpy()
        probe = LogisticRegression(max_iter=2000, C=1.0)
        scores[name] = cross_val_score(probe, features, labels, cv=3).mean()
    assert scores["shipped"] > 0.7
    assert scores["shipped"] > scores["random"] + 0.15


@pytest.mark.slow
def test_script_smoke_run_writes_loadable_weights(tmp_path):
    from MedLoRALib.adapters.manifest import sha256_file
    from MedLoRALib.models import create_backbone

    out = tmp_path / "smoke.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_tiny_backbone.py"), "--steps", "1",
                             "--batch-size", "6", "--val-size", "6", "--threads", "1", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    record = json.loads(out.with_suffix(".json").read_text())
    assert summary["sha256"] == record["sha256"] == sha256_file(out)
    assert record["pretext_task"]["train_patches"] == 6 and record["config"]["steps"] == 1
    assert "--steps 1" in record["command"]
    _, info = create_backbone("medlora_tiny", weights=out)
    assert info.weights_sha256 == record["sha256"]


def test_shipped_backbone_is_registered_by_name():
    from MedLoRALib.models import create_backbone

    _, info = create_backbone("medlora_tiny_synthct")  # no weights argument, no hub, no random init
    assert not info.random_init and Path(info.weights_path).name == "medlora_tiny_synthct.safetensors"
