"""The synthetic chest CT: nodules where the records say, balanced classes, no size/density shortcut."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_imports_without
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from MedLoRALib.cli import main
from MedLoRALib.ctio import load_ct
from MedLoRALib.errors import MedLoRAError
from MedLoRALib.image import CTImage
from MedLoRALib.nodule import Nodule
from MedLoRALib.synthetic import (
    MANIFEST_COLUMNS,
    PhantomConfig,
    make_phantom,
    margin_irregularity,
    oblique_direction,
    shortcut_auc,
    shortcut_features,
    write_cohort,
    write_dicom_series,
)

SMALL = PhantomConfig(size=(128, 112, 40), spacing=(0.9, 1.1, 2.5), n_nodules=2)


def _small_sphere_mean(image: CTImage, centre_lps) -> float:
    """Mean HU within 2 mm of a point."""
    return float(shortcut_features(image, [Nodule(centre_lps=centre_lps, diameter_mm=4.0)])[0, 1])


def _assert_nodules_where_recorded(image: CTImage, nodules: list[Nodule]) -> None:
    lung_hu = np.median(image.voxels_hu[(image.voxels_hu > -950) & (image.voxels_hu < -700)])
    for nodule in nodules:
        assert image.geometry.contains_lps(np.array(nodule.centre_lps))[0]
        assert _small_sphere_mean(image, nodule.centre_lps) > lung_hu + 150, nodule.nodule_id
        # 8 mm beyond the recorded radius it is lung again (in most directions)
        shell = np.asarray(nodule.centre_lps) + (nodule.diameter_mm / 2 + 8.0) * np.array(
            [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
        assert np.median([_small_sphere_mean(image, p) for p in shell]) < -500, nodule.nodule_id


def test_default_phantom_records_and_nodules():
    image, nodules = make_phantom(seed=1)
    config = PhantomConfig()
    assert image.voxels_hu.dtype == np.int16 and image.geometry.size == config.size
    assert len(nodules) == config.n_nodules and sorted(n.label for n in nodules) == [0, 0, 1, 1]
    low, high = config.diameter_range_mm
    for n, nodule in enumerate(nodules, start=1):
        assert nodule.nodule_id == f"PHANTOM/n{n}" and nodule.case_id == "PHANTOM"
        assert nodule.source == "phantom" and nodule.series_uid == image.ids.series_uid
        assert low <= nodule.diameter_mm <= high
        # centres keep the edge margin (in voxel-grid distance)
        ijk = image.geometry.lps_to_ijk(np.array(nodule.centre_lps))
        distance_mm = np.minimum(ijk, np.array(config.size) - 1 - ijk) * np.array(config.spacing)
        assert distance_mm.min() >= config.edge_margin_mm - 1e-6
    _assert_nodules_where_recorded(image, nodules)
    # the anatomy: air outside, soft tissue, lung inside
    assert image.voxels_hu[:, 0, 0].mean() < -950
    assert np.mean(image.voxels_hu < -700) > 0.15


def test_oblique_anisotropic_grid_puts_nodules_at_their_world_centres():
    config = PhantomConfig(size=(160, 150, 56), spacing=(0.8, 1.2, 3.0), direction=oblique_direction(), n_nodules=3)
    image, nodules = make_phantom(config, seed=5)
    np.testing.assert_allclose(image.geometry.direction, np.asarray(oblique_direction()).reshape(3, 3))
    _assert_nodules_where_recorded(image, nodules)


def test_same_seed_same_phantom_other_seed_other_phantom():
    a, nodules_a = make_phantom(SMALL, seed=4)
    b, nodules_b = make_phantom(SMALL, seed=4)
    c, nodules_c = make_phantom(SMALL, seed=5)
    np.testing.assert_array_equal(a.voxels_hu, b.voxels_hu)
    assert [n.to_dict() for n in nodules_a] == [n.to_dict() for n in nodules_b]
    assert a.ids.series_uid == b.ids.series_uid != c.ids.series_uid
    assert not np.array_equal(a.voxels_hu, c.voxels_hu)
    assert [n.centre_lps for n in nodules_a] != [n.centre_lps for n in nodules_c]


def test_given_labels_are_used():
    _, nodules = make_phantom(SMALL, seed=2, labels=[1, 1], case_id="X-7")
    assert [n.label for n in nodules] == [1, 1] and nodules[0].nodule_id == "X-7/n1"


def test_impossible_requests_are_refused():
    with pytest.raises(MedLoRAError, match="too small"):
        make_phantom(PhantomConfig(size=(40, 40, 10)))
    with pytest.raises(MedLoRAError, match="could not place"):
        make_phantom(PhantomConfig(n_nodules=40, diameter_range_mm=(18.0, 20.0)))
    with pytest.raises(MedLoRAError, match="orthonormal"):
        PhantomConfig(direction=(1, 0, 0, 0, 2, 0, 0, 0, 1))
    with pytest.raises(MedLoRAError, match="labels must be 0 or 1"):
        make_phantom(SMALL, labels=[0, 2])


# --------------------------------------------------------------------------------------------
# The cohort and the shortcut
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """12 cases × 4 nodules as NRRD, the cohort the demo and training tests use."""
    return write_cohort(tmp_path_factory.mktemp("cohort"), 12, seed=0)


@pytest.fixture(scope="module")
def cohort_rows(cohort) -> list[dict]:
    with open(cohort, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohort_features(cohort, cohort_rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shortcut features, labels and margin irregularity, measured on the images read back from disk."""
    features, labels, irregularity = [], [], []
    for image_name in sorted({row["image"] for row in cohort_rows}):
        image = load_ct(cohort.parent / image_name)
        rows = [r for r in cohort_rows if r["image"] == image_name]
        nodules = [Nodule(centre_lps=(float(r["x"]), float(r["y"]), float(r["z"])), nodule_id=r["nodule_id"],
                          diameter_mm=float(r["diameter_mm"]), label=int(r["label"])) for r in rows]
        features.append(shortcut_features(image, nodules))
        labels += [n.label for n in nodules]
        irregularity += [margin_irregularity(image, n) for n in nodules]
    return np.vstack(features), np.array(labels), np.array(irregularity)


@pytest.mark.slow
def test_cohort_manifest_is_balanced_and_points_at_the_images(cohort, cohort_rows):
    assert list(cohort_rows[0]) == list(MANIFEST_COLUMNS)
    assert len(cohort_rows) == 48
    assert sum(int(r["label"]) for r in cohort_rows) == 24
    assert {r["patient_id"] for r in cohort_rows} == {f"SYN-{n:04d}" for n in range(1, 13)}
    assert {r["coordinate_system"] for r in cohort_rows} == {"LPS"}
    assert len({r["nodule_id"] for r in cohort_rows}) == 48
    for row in cohort_rows:
        assert (cohort.parent / row["image"]).is_file()
        assert row["image"] == f"{row['patient_id']}.nrrd"
    first = load_ct(cohort.parent / cohort_rows[0]["image"])
    nodules = [Nodule(centre_lps=(float(r["x"]), float(r["y"]), float(r["z"])), diameter_mm=float(r["diameter_mm"]))
               for r in cohort_rows if r["image"] == cohort_rows[0]["image"]]
    _assert_nodules_where_recorded(first, nodules)


@pytest.mark.slow
def test_size_and_density_do_not_separate_the_classes(cohort_features):
    features, labels, _ = cohort_features
    assert features.shape == (48, 2)
    for label in (0, 1):  # both classes span small and large, dim and bright
        diameters, mean_hu = features[labels == label].T
        assert diameters.min() < 10 and diameters.max() > 16
        assert mean_hu.min() < -300 and mean_hu.max() > -150
    scaled = StandardScaler().fit_transform(features)
    in_sample = roc_auc_score(labels, LogisticRegression().fit(scaled, labels).predict_proba(scaled)[:, 1])
    assert in_sample < 0.8
    assert shortcut_auc(features, labels) < 0.8


@pytest.mark.slow
def test_shape_separates_the_classes(cohort_features):
    _, labels, irregularity = cohort_features
    assert np.median(irregularity[labels == 1]) > 1.5 * np.median(irregularity[labels == 0])
    assert roc_auc_score(labels, irregularity) > 0.8


def test_shortcut_features_measure_the_sphere():
    image, nodules = make_phantom(SMALL, seed=8)
    features = shortcut_features(image, nodules)
    np.testing.assert_allclose(features[:, 0], [n.diameter_mm for n in nodules])
    lung = Nodule(centre_lps=nodules[0].centre_lps, diameter_mm=60.0)  # a sphere mostly of lung and chest
    assert shortcut_features(image, [lung])[0, 1] < features[0, 1]
    with pytest.raises(MedLoRAError, match="diameter"):
        shortcut_features(image, [Nodule(centre_lps=(0, 0, 0))])


def test_shortcut_auc_needs_both_classes():
    with pytest.raises(MedLoRAError, match="each class"):
        shortcut_auc(np.zeros((10, 2)), [0] * 10)


# --------------------------------------------------------------------------------------------
# DICOM output, the command line, and the torch-free promise
# --------------------------------------------------------------------------------------------
def test_dicom_cohort_reads_back(tmp_path):
    manifest = write_cohort(tmp_path, 2, seed=3, config=SMALL, fmt="dicom")
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == ["SYN-0001", "SYN-0001", "SYN-0002", "SYN-0002"]
    assert sorted(int(r["label"]) for r in rows) == [0, 0, 1, 1]
    image = load_ct(tmp_path / "SYN-0001")
    assert image.ids.patient_id == "SYN-0001" and image.geometry.size == SMALL.size
    again = write_cohort(tmp_path, 2, seed=3, config=SMALL, fmt="dicom")  # rewriting replaces the series
    np.testing.assert_array_equal(load_ct(tmp_path / "SYN-0001").voxels_hu, image.voxels_hu)
    assert again == manifest and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_dicom_writer_refusals(tmp_path):
    image, _ = make_phantom(SMALL, seed=1)
    fractional = CTImage(image.voxels_hu.astype(np.float32) + 0.5, image.geometry)
    with pytest.raises(MedLoRAError, match="fractional"):
        write_dicom_series(fractional, tmp_path / "f")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(MedLoRAError, match="already holds files"):
        write_dicom_series(image, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_cli_writes_a_cohort(tmp_path, capsys):
    code = main(["phantom", "--out", str(tmp_path / "c"), "--cases", "1", "--seed", "2", "--oblique",
                 "--spacing", "0.9", "1.1", "2.5", "--size", "128", "112", "40", "--nodules", "2"])
    assert code == 0
    assert str(tmp_path / "c" / "manifest.csv") in capsys.readouterr().out
    image = load_ct(tmp_path / "c" / "SYN-0001.nrrd")
    assert image.geometry.spacing == pytest.approx((0.9, 1.1, 2.5))
    assert not np.allclose(image.geometry.direction, np.eye(3))


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert main(["phantom", "--out", str(tmp_path), "--cases", "0"]) == 2
    assert "at least one case" in capsys.readouterr().err


def test_cli_never_overwrites_what_it_did_not_write(tmp_path, capsys):
    from helpers import tree_digest

    small = ["--size", "128", "112", "40", "--nodules", "1"]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "SYN-0001.nrrd").write_bytes(b"a user's own scan with the cohort's file name")
    before = tree_digest(out)
    for extra in ([], ["--overwrite"]):
        assert main(["phantom", "--out", str(out), "--cases", "1", *small, *extra]) == 2
        assert "did not write (SYN-0001.nrrd)" in capsys.readouterr().err
    assert tree_digest(out) == before
    (tmp_path / "file").write_text("x")
    assert main(["phantom", "--out", str(tmp_path / "file"), "--cases", "1", *small]) == 2
    assert "is a file" in capsys.readouterr().err


def test_cli_replaces_an_earlier_cohort_only_with_overwrite(tmp_path, capsys):
    small = ["--size", "128", "112", "40", "--nodules", "1"]
    out = tmp_path / "cohort"
    assert main(["phantom", "--out", str(out), "--cases", "2", *small]) == 0
    assert main(["phantom", "--out", str(out), "--cases", "1", *small]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "SYN-0002.nrrd").is_file()
    assert main(["phantom", "--out", str(out), "--cases", "1", "--format", "dicom", "--overwrite", *small]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["SYN-0001", "manifest.csv"]  # the earlier cases are gone
    # a DICOM cohort (a folder per case) is the phantom's own too: replaced with --overwrite
    assert main(["phantom", "--out", str(out), "--cases", "1", "--overwrite", *small]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["SYN-0001.nrrd", "manifest.csv"]


def test_cli_that_fails_leaves_no_folder_and_keeps_an_earlier_cohort(tmp_path, capsys):
    """The cohort is written into a staging folder that replaces --out only when complete."""
    from helpers import tree_digest

    too_small = ["--size", "8", "8", "8"]
    assert main(["phantom", "--out", str(tmp_path / "new"), "--cases", "1", *too_small]) == 2
    assert "too small" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no empty --out, no staging folder left
    out = tmp_path / "cohort"
    assert main(["phantom", "--out", str(out), "--cases", "1", "--size", "128", "112", "40", "--nodules", "1"]) == 0
    before = tree_digest(out)
    assert main(["phantom", "--out", str(out), "--cases", "1", "--overwrite", *too_small]) == 2
    assert tree_digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]


def test_phantom_and_ctio_import_no_torch():
    assert_imports_without(["MedLoRALib.synthetic", "MedLoRALib.ctio", "MedLoRALib.cli.phantom"],
                           then="import MedLoRALib.synthetic as p; p.make_phantom(p.PhantomConfig(size=(128, 112, 40), "
                                "n_nodules=1))")


# --------------------------------------------------------------------------------------------
# Same seed, same voxels: digests recorded from the code before the synthetic/ package split
# --------------------------------------------------------------------------------------------
def _phantom_digest(image: CTImage, nodules: list[Nodule]) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(image.voxels_hu).tobytes())
    digest.update(json.dumps([n.to_dict() for n in nodules], sort_keys=True, default=str).encode())
    digest.update(repr(image.geometry.origin_lps).encode() + image.ids.series_uid.encode())
    return digest.hexdigest()


def _tree_bytes_digest(root: Path) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.relative_to(root).as_posix().encode() + p.read_bytes() for p in files)).hexdigest()


def test_same_seed_gives_the_recorded_voxels(tmp_path):
    """Refactoring the generator must not change a single voxel, nodule or DICOM byte.

    The digests were computed with the code on main before the split into ``synthetic/``
    (numpy 2 / SciPy on x86-64); a change here changes every cohort, the demo and the benchmarks.
    """
    assert _phantom_digest(*make_phantom(SMALL, seed=4)) == (
        "666553260eeca4626d41e776fb92eabf70bc40e5d871ba903c618aeb119cc0d3")
    oblique = PhantomConfig(size=(128, 112, 40), spacing=(0.9, 1.1, 2.5), n_nodules=1, direction=oblique_direction())
    assert _phantom_digest(*make_phantom(oblique, seed=5, labels=[1], case_id="X")) == (
        "5f5e5beeb6fc5d5b7dadde12e667ef64fb4cac3350603993d2931f453b49e073")
    write_cohort(tmp_path / "dicom", 2, seed=3, config=SMALL, fmt="dicom")
    assert _tree_bytes_digest(tmp_path / "dicom") == "1992159add4506add0b3c53c75b51132a268ccde6a8a27e0f6eaad4598fdec11"


def test_phantom_without_vessels_places_its_nodules():
    from MedLoRALib.synthetic import PhantomConfig, make_phantom

    image, nodules = make_phantom(PhantomConfig(size=(96, 96, 32), vessels=False, n_nodules=2), seed=3)
    assert len(nodules) == 2 and image.geometry.contains_lps(np.array([n.centre_lps for n in nodules])).all()


def test_cli_help_shows_every_default(capsys):
    import argparse

    from MedLoRALib.cli import build_parser

    parser = build_parser("phantom")
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    phantom = sub.choices["phantom"]
    with_defaults = [a for a in phantom._actions if not any(a.default is v for v in (None, False, argparse.SUPPRESS))]
    assert {a.dest for a in with_defaults} >= {"cases", "seed", "format", "spacing", "size", "nodules"}
    text = " ".join(phantom.format_help().split())
    for action in with_defaults:
        shown = " ".join(f"{v:g}" for v in action.default) if isinstance(action.default, tuple) else action.default
        assert f"default {shown})" in text, action.dest
