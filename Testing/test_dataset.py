"""Training manifests, ``medlora dataset check``, patient splits and on-the-fly augmented patches."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_imports_without

from MedLoRALib.cli import main
from MedLoRALib.ctio import save_volume
from MedLoRALib.errors import DatasetError
from MedLoRALib.geometry import Geometry, lps_to_ras
from MedLoRALib.image import CTImage
from MedLoRALib.patches import PatchSpec, extract_patches
from MedLoRALib.training import augment as aug
from MedLoRALib.training.manifest import check_training_set, crop_to_reach, load_training_set, read_rows
from MedLoRALib.training.splits import holdout_split, kfold_splits

# An oblique grid: direction columns are not the LPS axes, so index/world mix-ups show.
_C, _S = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
OBLIQUE = np.array([[_C, -_S, 0.0], [_S, _C, 0.0], [0.0, 0.0, 1.0]])


def chest_like_volume(centres_lps: list, radius_mm: float = 5.0, size=(60, 56, 24), seed: int = 0) -> CTImage:
    """Soft tissue body (so no point sits in outside air) with lung-density inside and bright spheres."""
    geometry = Geometry(size=size, spacing=(0.9, 0.8, 2.5), origin_lps=(-25.0, -20.0, -30.0), direction=OBLIQUE)
    k, j, i = np.indices(size[::-1])
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    lps = geometry.ijk_to_lps(ijk).reshape(size[::-1] + (3,))
    voxels = np.full(size[::-1], 30.0)
    inner = (np.abs(ijk[:, 0] - size[0] / 2) < size[0] / 2 - 4) & (np.abs(ijk[:, 1] - size[1] / 2) < size[1] / 2 - 4)
    voxels.reshape(-1)[inner] = -850.0
    voxels += np.random.default_rng(seed).normal(0, 15, voxels.shape)
    for centre in centres_lps:
        voxels[np.linalg.norm(lps - np.asarray(centre), axis=-1) < radius_mm] = 40.0
    return CTImage(voxels_hu=np.round(voxels).astype(np.int16), geometry=geometry)


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


CENTRE_A = (-5.0, 2.0, -4.0)
CENTRE_B = (8.0, 6.0, 3.0)


@pytest.fixture(scope="module")
def two_volumes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vols")
    save_volume(chest_like_volume([CENTRE_A, CENTRE_B]), folder / "a.nrrd")
    save_volume(chest_like_volume([CENTRE_A], seed=1), folder / "b.nii.gz")
    return folder


def _row(image, centre, label, patient, system="LPS", **extra) -> dict:
    x, y, z = centre if system == "LPS" else lps_to_ras(np.array(centre))
    return {"image": image, "x": x, "y": y, "z": z, "coordinate_system": system, "label": label,
            "patient_id": patient, **extra}


def test_csv_manifest_reads_labels_coordinate_systems_and_exclusions(two_volumes):
    rows = [_row("a.nrrd", CENTRE_A, "malignant", "P1", nodule_id="a1"),
            _row("a.nrrd", CENTRE_B, "B", "P1", system="RAS", nodule_id="a2"),
            _row("b.nii.gz", CENTRE_A, "", "P2", malignancy="4.5", nodule_id="b1"),
            _row(str(two_volumes / "b.nii.gz"), CENTRE_B, "", "P2", malignancy="3", nodule_id="b2")]
    manifest = write_csv(two_volumes / "m.csv", rows)
    data = check_training_set(manifest)
    by_id = {s.nodule_id: s for s in data.samples}
    assert sorted(by_id) == ["a1", "a2", "b1"]
    # the RAS row lands on the same LPS point it was computed from
    assert np.allclose(by_id["a2"].centre_lps, CENTRE_B)
    assert [by_id[k].label for k in ("a1", "a2", "b1")] == [1, 0, 1]  # LIDC rule: median 4.5 → malignant
    assert len(data.excluded) == 1 and "malignancy 3" in data.excluded[0]
    assert data.images[by_id["a1"].image_key] is data.images[by_id["a2"].image_key]  # loaded once
    summary = data.summary()
    assert (summary["benign"], summary["malignant"], summary["patients"], summary["images"]) == (1, 2, 2, 2)

    # the same rows as JSON give the same nodules
    json_manifest = two_volumes / "m.json"
    json_manifest.write_text(json.dumps({"nodules": rows}))
    again = check_training_set(json_manifest)
    assert [(s.nodule_id, s.label, s.centre_lps) for s in again.samples] == \
           [(s.nodule_id, s.label, s.centre_lps) for s in data.samples]


def test_dataset_check_lists_every_problem_at_once(two_volumes, capsys):
    far = (400.0, 0.0, 0.0)
    rows = [_row("a.nrrd", CENTRE_A, 1, "P1"),
            _row("a.nrrd", (CENTRE_A[0] + 1.0, CENTRE_A[1], CENTRE_A[2]), 1, "P1"),  # 1 mm away: duplicate
            _row("a.nrrd", far, 0, "P1"),  # outside the volume
            _row("missing.nrrd", CENTRE_A, 0, "P3"),
            _row("b.nii.gz", CENTRE_A, 0, ""),  # no patient id
            _row("b.nii.gz", CENTRE_B, "perhaps", "P2"),  # unknown label
            {**_row("b.nii.gz", CENTRE_B, 0, "P2"), "coordinate_system": ""}]  # no coordinate system
    manifest = write_csv(two_volumes / "bad.csv", rows)
    _, problems = load_training_set(manifest, keep_images=False)
    text = "\n".join(problems)
    assert "line 2 and line 3: duplicate nodule, centres 1.0 mm apart" in text  # the header is line 1
    assert "line 4" in text and "outside the CT volume" in text
    assert "line 5: image not found" in text and "missing.nrrd" in text
    assert "line 6: no patient_id" in text
    assert "line 7: label 'perhaps' is not 0/1 or benign/malignant" in text
    assert "line 8: no coordinate_system" in text
    assert "all 2 usable nodules are malignant" in text  # what is left after the bad rows
    assert len(problems) == 7

    assert main(["dataset", "check", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "7 problem(s)" in err and "missing.nrrd" in err and "Traceback" not in err


def test_dataset_check_summary_and_json(two_volumes, capsys):
    rows = [_row("a.nrrd", CENTRE_A, 1, f"P{n}") if n % 2 else _row("b.nii.gz", CENTRE_A, 0, f"P{n}")
            for n in range(6)]
    # one image belongs to one patient: give each patient its own image file
    for n, row in enumerate(rows):
        target = two_volumes / f"p{n}.nrrd"
        if not target.exists():
            save_volume(chest_like_volume([CENTRE_A], seed=n), target)
        row["image"] = target.name
    manifest = write_csv(two_volumes / "good.csv", rows)
    assert main(["dataset", "check", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "6 nodules (3 benign, 3 malignant) from 6 patients" in out
    assert "P5" in out
    assert main(["dataset", "check", str(manifest), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["per_patient"]["P1"] == {"benign": 0, "malignant": 1}
    # 6 patients cannot give 10 folds
    assert main(["dataset", "check", str(manifest), "--folds", "10"]) == 2
    assert "needs at least 10 patients" in capsys.readouterr().err


def test_one_class_and_shared_image_are_problems(two_volumes):
    manifest = write_csv(two_volumes / "one.csv", [_row("a.nrrd", CENTRE_A, 1, "P1"),
                                                   _row("a.nrrd", CENTRE_B, 1, "P2")])
    _, problems = load_training_set(manifest, keep_images=False)
    assert any("all 2 usable nodules are malignant" in p for p in problems)
    assert any("assigned to 2 patients" in p for p in problems)


def test_manifest_file_level_errors(tmp_path):
    with pytest.raises(DatasetError, match="manifest not found"):
        read_rows(tmp_path / "nope.csv")
    (tmp_path / "cols.csv").write_text("path,x,y,z\nfoo,1,2,3\n")
    with pytest.raises(DatasetError, match="no 'image' column"):
        read_rows(tmp_path / "cols.csv")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_rows(tmp_path / "bad.json")


@pytest.mark.slow
def test_lidc_annotation_rows_use_the_importer_and_the_lidc_rule(lidc_0001, lidc_0003, tmp_path, capsys):
    manifest = write_csv(tmp_path / "lidc.csv", [
        {"image": str(lidc_0001), "annotations": str(lidc_0001 / "069.xml")},
        {"image": str(lidc_0003), "annotations": str(lidc_0003 / "072.xml")}])
    # Two patients, one without a benign nodule: no split by patient has both classes on both sides.
    assert main(["dataset", "check", str(manifest), "--json"]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "cannot give every training and validation set both classes" in captured.err
    assert len(report["problems"]) == 1
    # 0001: ratings 5,5,5,4 → malignant; 0003: 5,5,3,4 → malignant, a single read of 2 → benign,
    # and two nodules with median 3.5 excluded by the LIDC rule
    assert report["per_patient"] == {"LIDC-IDRI-0001": {"benign": 0, "malignant": 1},
                                     "LIDC-IDRI-0003": {"benign": 1, "malignant": 1}}
    assert len(report["excluded"]) == 2 and all("median malignancy 3.5" in e for e in report["excluded"])


# --- splits ---------------------------------------------------------------------------------------


def _cohort(n_patients: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    pids, labels = [], []
    for p in range(n_patients):
        for _ in range(rng.integers(1, 5)):
            pids.append(f"P{p}")
            labels.append(int(rng.random() < 0.4))
    return pids, np.array(labels)


def test_holdout_split_is_by_patient_stratified_and_seeded():
    pids, labels = _cohort(40)
    split = holdout_split(pids, labels, 0.25, seed=3)
    train_p = {pids[i] for i in split.train}
    val_p = {pids[i] for i in split.val}
    assert not train_p & val_p
    assert len(split.train) + len(split.val) == len(labels)
    assert abs(len(split.val) / len(labels) - 0.25) < 0.05
    assert abs(labels[split.val].mean() - labels.mean()) < 0.08
    again = holdout_split(pids, labels, 0.25, seed=3)
    assert np.array_equal(again.val, split.val)
    assert not np.array_equal(holdout_split(pids, labels, 0.25, seed=4).val, split.val)


def test_kfold_validates_every_patient_once():
    pids, labels = _cohort(30, seed=1)
    splits = kfold_splits(pids, labels, 5, seed=0)
    all_val = np.concatenate([s.val for s in splits])
    assert sorted(all_val.tolist()) == list(range(len(labels)))
    for s in splits:
        assert not {pids[i] for i in s.train} & {pids[i] for i in s.val}
        assert set(labels[s.val]) == {0, 1}


def test_impossible_splits_say_why():
    with pytest.raises(DatasetError, match="at least 2 patients"):
        holdout_split(["P1", "P1"], np.array([0, 1]), 0.5, 0)
    with pytest.raises(DatasetError, match="both classes"):
        holdout_split(["P1", "P2", "P3"], np.array([1, 1, 0]), 0.3, 0)


# --- patches and augmentation --------------------------------------------------------------------


def test_cropped_volume_gives_the_same_patches_with_less_memory():
    image = chest_like_volume([CENTRE_A], size=(120, 110, 40))
    spec = PatchSpec(views="ortho3", fov_mm=20.0, pixels=24)
    config = aug.AugmentConfig(shift_mm=3.0)
    reach = aug.patch_reach_mm(spec, config)
    cropped = crop_to_reach(image, [CENTRE_A], reach)
    assert cropped.voxels_hu.size < 0.5 * image.voxels_hu.size
    for index in range(5):
        full = aug.cut_patch(image, CENTRE_A, spec, config, aug.sample_rng(0, 1, index))
        small = aug.cut_patch(cropped, CENTRE_A, spec, config, aug.sample_rng(0, 1, index))
        np.testing.assert_allclose(full, small, atol=1e-5)


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    image = chest_like_volume([CENTRE_A])
    spec = PatchSpec(views="multiview9", fov_mm=24.0, pixels=16)
    config = aug.AugmentConfig()
    first = aug.cut_patch(image, CENTRE_A, spec, config, aug.sample_rng(7, 2, 5))
    again = aug.cut_patch(image, CENTRE_A, spec, config, aug.sample_rng(7, 2, 5))
    other = aug.cut_patch(image, CENTRE_A, spec, config, aug.sample_rng(7, 3, 5))
    assert np.array_equal(first, again) and not np.allclose(first, other)
    plain = aug.cut_patch(image, CENTRE_A, spec)
    assert np.array_equal(plain, extract_patches(image, np.array([CENTRE_A]), spec)[0])
    # no augmentation settings at all leave the patch as the scoring engine cuts it
    assert np.allclose(aug.cut_patch(image, CENTRE_A, spec, aug.AugmentConfig.none(), aug.sample_rng(0, 0, 0)), plain)


def test_augmented_patch_keeps_the_nodule_in_the_middle():
    size = (60, 56, 24)
    middle = chest_like_volume([], size=size).geometry.ijk_to_lps((np.asarray(size) - 1) / 2.0)
    image = chest_like_volume([middle], radius_mm=5.0, size=size)
    spec = PatchSpec(views="axial", fov_mm=16.0, pixels=16)
    config = aug.AugmentConfig(shift_mm=2.0, noise_hu=0.0)
    for index in range(8):
        patch = aug.cut_patch(image, middle, spec, config, aug.sample_rng(0, 0, index))[0]
        centre_value = patch[6:10, 6:10].mean()
        corner_value = patch[:3, :3].mean()
        assert centre_value > 0.6 and corner_value < 0.3  # nodule (40 HU) vs lung (−850 HU) in window −1000…400


def test_random_rotations_are_proper_and_cover_all_orientations():
    rng = np.random.default_rng(0)
    rotations = np.array([aug.random_rotation(rng, 180.0) for _ in range(2000)])
    assert np.allclose(rotations @ rotations.transpose(0, 2, 1), np.eye(3), atol=1e-9)
    assert np.allclose(np.linalg.det(rotations), 1.0)
    assert np.abs(rotations.mean(axis=0)).max() < 0.05  # uniform over SO(3): E[R] = 0
    small = np.array([aug.random_rotation(rng, 10.0) for _ in range(200)])
    angles = np.degrees(np.arccos(np.clip((np.trace(small, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert angles.max() <= 10.0 + 1e-6


@pytest.mark.slow  # 3-4.5 s: a fresh interpreter runs the check
def test_dataset_check_and_torch_free_training_modules_never_import_torch(two_volumes):
    """``medlora dataset check`` (and the Slicer module) must run without torch."""
    manifest = write_csv(two_volumes / "torchfree.csv", [_row("a.nrrd", CENTRE_A, 1, "P1")])
    assert_imports_without(
        ["MedLoRALib.cli", "MedLoRALib.training.manifest", "MedLoRALib.training.splits",
         "MedLoRALib.training.metrics", "MedLoRALib.training.reports", "MedLoRALib.training.augment",
         "MedLoRALib.training.progress"],
        then=f"from MedLoRALib.cli import main; main(['dataset', 'check', {str(manifest)!r}])")
