"""``medlora crop`` end to end on synthetic CT files: patches, index CSV, cube geometry, errors."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import assert_imports_without, tree_digest
from PIL import Image

from MedLoRALib.cli import main
from MedLoRALib.crops import montage
from MedLoRALib.ctio import load_ct, save_volume
from MedLoRALib.geometry import Geometry, lps_to_ras
from MedLoRALib.image import CTImage
from MedLoRALib.patches import PatchSpec, extract_patches

_A = np.radians(10)
OBLIQUE = np.array([[np.cos(_A), -np.sin(_A), 0.0], [np.sin(_A), np.cos(_A), 0.0], [0.0, 0.0, 1.0]])


def phantom_ct(direction=OBLIQUE, origin=(-60.0, -50.0, -36.0)) -> tuple[CTImage, list[np.ndarray]]:
    """Air, a soft-tissue body with two lungs, and two bright 'nodules' (LPS centres returned)."""
    g = Geometry((80, 72, 36), (1.5, 1.4, 2.0), origin, direction)
    k, j, i = np.indices((36, 72, 80))
    world = g.ijk_to_lps(np.stack([i, j, k], -1).astype(float))
    centre = g.ijk_to_lps((39.5, 35.5, 17.5))
    rel = world - centre
    hu = np.full(world.shape[:-1], -1000.0)
    hu[(rel[..., 0] / 55) ** 2 + (rel[..., 1] / 45) ** 2 < 1] = 40.0
    for side in (-1, 1):
        lung = ((rel[..., 0] - side * 24) / 18) ** 2 + (rel[..., 1] / 30) ** 2 < 1
        hu[lung] = -850.0
    nodules = [centre + np.array([-24.0, 5.0, 3.0]), centre + np.array([22.0, -8.0, -6.0])]
    for c in nodules:
        hu += 900.0 * np.exp(-((world - c) ** 2).sum(-1) / (2 * 3.0 ** 2))
    return CTImage(hu.astype(np.float32), g), nodules


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> tuple[Path, CTImage, list[np.ndarray]]:
    ct, nodules = phantom_ct()
    path = save_volume(ct, tmp_path_factory.mktemp("ct") / "chest.nrrd")
    return path, load_ct(path), nodules


def points_csv(path: Path, nodules: list[np.ndarray]) -> Path:
    """First nodule in LPS, second in RAS, as Slicer users would write them."""
    (a, _), b_ras = nodules, lps_to_ras(nodules[1])
    path.write_text("nodule_id,x,y,z,coordinate_system,label\n"
                    f"left,{a[0]},{a[1]},{a[2]},LPS,malignant\n"
                    f"right,{b_ras[0]},{b_ras[1]},{b_ras[2]},RAS,0\n", encoding="utf-8")
    return path


def read_index(out: Path) -> list[dict]:
    with open(out / "index.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_crop_multiview9_png_and_index(tmp_path, ct_file):
    path, ct, nodules = ct_file
    points = points_csv(tmp_path / "points.csv", nodules)
    out = tmp_path / "out"
    assert main(["crop", "--volume", str(path), "--points", str(points), "--out", str(out)]) == 0
    rows = read_index(out)
    assert [r["nodule_id"] for r in rows] == ["left", "right"] and [r["label"] for r in rows] == ["1", "0"]
    np.testing.assert_allclose([[float(r[f"{a}_lps"]) for a in "xyz"] for r in rows], nodules, atol=1e-3)
    assert rows[0]["source"].startswith("points-csv:points.csv") and rows[0]["study"] == "chest.nrrd"
    expected = extract_patches(ct, np.array(nodules), PatchSpec(views="multiview9", fov_mm=50.0, pixels=64))
    for row, patch in zip(rows, expected):
        with Image.open(out / row["file"]) as png:
            assert png.size == (192, 192) and png.mode == "L"
            np.testing.assert_array_equal(np.asarray(png), montage(patch))
    axial = np.asarray(Image.open(out / rows[0]["file"]))[:64, :64]
    beside = np.r_[axial[30:34, 15:19].ravel(), axial[30:34, 45:49].ravel()]  # lung 12 mm left and right
    assert axial[30:34, 30:34].mean() > beside.mean() + 80  # the nodule is brighter than the lung


@pytest.mark.parametrize("pixels", [33, 32])
def test_cube_nrrd_overlays_the_ct_at_the_nodule(tmp_path, ct_file, pixels):
    path, ct, nodules = ct_file
    points = points_csv(tmp_path / "points.csv", nodules)
    out = tmp_path / "cubes"
    assert main(["crop", "--volume", str(path), "--points", str(points), "--out", str(out),
                 "--views", "cube", "--pixels", str(pixels), "--fov-mm", "24"]) == 0
    rows = read_index(out)
    assert all(r["file"].endswith(".nrrd") for r in rows)
    for row, centre in zip(rows, nodules):
        cube = sitk.ReadImage(str(out / row["file"]))
        middle = [(pixels - 1) / 2] * 3
        np.testing.assert_allclose(cube.TransformContinuousIndexToPhysicalPoint(middle), centre, atol=1e-4)
        assert cube.GetSpacing() == pytest.approx((24 / pixels,) * 3)
        values = sitk.GetArrayFromImage(cube)
        # HU values: the CT resampled onto the cube's own grid by SimpleITK gives the same numbers
        resampled = sitk.Resample(ct.to_sitk(), cube, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
        np.testing.assert_allclose(values, sitk.GetArrayFromImage(resampled), atol=0.05)
        m = pixels // 2
        assert values[m - 1:m + 1, m - 1:m + 1, m - 1:m + 1].mean() > -300  # the nodule, in HU
        assert values[m - 1:m + 1, m - 1:m + 1, m - 1:m + 1].mean() > np.median(values) + 300


def test_crop_real_entry_point_with_markups_and_npy(tmp_path, ct_file):
    from MedLoRALib.annotations import write_markups
    from MedLoRALib.nodule import Nodule

    path, ct, nodules = ct_file
    markups = write_markups([Nodule(tuple(c), nodule_id=f"n{i}") for i, c in enumerate(nodules)],
                            tmp_path / "points.mrk.json", coordinate_system="RAS")
    out = tmp_path / "npy"
    result = subprocess.run([sys.executable, "-m", "MedLoRALib", "crop", "--volume", str(path), "--points",
                             str(markups), "--out", str(out), "--views", "ortho3", "--pixels", "16",
                             "--format", "npy", "--window", "-1200", "600"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 2 patch(es)" in result.stdout
    rows = read_index(out)
    patch = np.load(out / rows[1]["file"])
    spec = PatchSpec(views="ortho3", fov_mm=50.0, pixels=16, window_hu=(-1200.0, 600.0))
    np.testing.assert_array_equal(patch, extract_patches(ct, nodules[1][None], spec)[0])


def test_folder_of_studies_with_luna16_csv(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    centres = {}
    for uid, direction in (("1.2.840.1", np.eye(3)), ("1.2.840.2", OBLIQUE)):
        ct, nodules = phantom_ct(direction)
        save_volume(ct, studies / f"{uid}.nrrd")
        centres[uid] = nodules
    (studies / "notes.txt").write_text("not a study")
    luna = tmp_path / "annotations.csv"
    lines = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    lines += [f"{uid},{c[0]},{c[1]},{c[2]},6.0" for uid, cs in centres.items() for c in cs]
    lines.append("9.9.9,0,0,0,5.0")  # a series not in the folder
    luna.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["crop", "--volume", str(studies), "--points", str(luna), "--out", str(out),
                 "--views", "axial", "--pixels", "24"]) == 0
    rows = read_index(out)
    assert [r["study"] for r in rows] == ["1.2.840.1.nrrd"] * 2 + ["1.2.840.2.nrrd"] * 2
    assert len({r["file"] for r in rows}) == 4 and all((out / r["file"]).is_file() for r in rows)
    np.testing.assert_allclose([[float(r[f"{a}_lps"]) for a in "xyz"] for r in rows],
                               [c for cs in centres.values() for c in cs], atol=1e-3)


# --- errors: exit code 2, a clear message, no traceback ------------------------------------------
def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["crop", *map(str, argv)])
    return code, capsys.readouterr().err


def test_point_outside_the_volume(tmp_path, ct_file, capsys):
    path, _, nodules = ct_file
    points = tmp_path / "p.csv"
    points.write_text(f"x,y,z,coordinate_system,nodule_id\n{nodules[0][0]},{nodules[0][1]},{nodules[0][2]},LPS,ok\n"
                      "0,0,900,LPS,far\n")
    code, err = run_cli(capsys, "--volume", path, "--points", points, "--out", tmp_path / "o")
    assert code == 2 and "#2 far at LPS (0.0, 0.0, 900.0) mm is outside the CT volume" in err
    assert "Traceback" not in err and not (tmp_path / "o" / "index.csv").exists()


def test_ras_point_given_as_lps_is_caught(tmp_path, capsys):
    """With the patient off the scanner's x = y = 0 (as usual: table height), a RAS point read
    as LPS lands outside the body; the message says so. (Centred on 0, a swap only moves the
    point to the other lung, which no geometry check can notice.)"""
    ct, nodules = phantom_ct(origin=(-60.0, -150.0, -36.0))
    path = save_volume(ct, tmp_path / "offset.nrrd")
    ras = lps_to_ras(nodules[0])
    points = tmp_path / "p.csv"
    points.write_text(f"x,y,z,coordinate_system\n{ras[0]},{ras[1]},{ras[2]},LPS\n")
    code, err = run_cli(capsys, "--volume", path, "--points", points, "--out", tmp_path / "o")
    assert code == 2 and "RAS and LPS are probably swapped" in err


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"x,y,z,coordinate_system\n", "has a header but no rows"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8"),
])
def test_empty_or_unreadable_points_file(tmp_path, ct_file, capsys, content, message):
    points = tmp_path / "points.csv"
    points.write_bytes(content)
    code, err = run_cli(capsys, "--volume", ct_file[0], "--points", points, "--out", tmp_path / "o")
    assert code == 2 and message in err and "points.csv" in err and "Traceback" not in err


def test_unreadable_volume_and_missing_files(tmp_path, ct_file, capsys):
    points = points_csv(tmp_path / "points.csv", ct_file[2])
    broken = tmp_path / "broken.nrrd"
    broken.write_bytes(b"NRRD0004\ntype: garbage\n\n")
    code, err = run_cli(capsys, "--volume", broken, "--points", points, "--out", tmp_path / "o")
    assert code == 2 and "broken.nrrd" in err and "Traceback" not in err
    code, err = run_cli(capsys, "--volume", ct_file[0], "--points", tmp_path / "nope.csv", "--out", tmp_path / "o")
    assert code == 2 and "not found" in err and "nope.csv" in err


def test_bad_option_combinations(tmp_path, ct_file, capsys):
    points = points_csv(tmp_path / "points.csv", ct_file[2])
    common = ["--volume", ct_file[0], "--points", points, "--out", tmp_path / "o"]
    code, err = run_cli(capsys, *common, "--views", "cube", "--format", "png")
    assert code == 2 and "use nrrd or npy" in err
    code, err = run_cli(capsys, *common, "--window", "400", "-1000")
    assert code == 2 and "high > low" in err
    code, err = run_cli(capsys, *common, "--min-readers", "2")
    assert code == 2 and "LIDC XML reads only" in err


def test_folder_of_studies_with_points_csv_images_and_a_broken_study(tmp_path, capsys):
    studies = tmp_path / "studies"
    studies.mkdir()
    ct, nodules = phantom_ct()
    save_volume(ct, studies / "a.nrrd")
    (studies / "b.nrrd").write_bytes(b"NRRD0004\ntype: garbage\n\n")
    points = tmp_path / "manifest.csv"
    points.write_text("x,y,z,coordinate_system,image\n"
                      + "".join(f"{c[0]},{c[1]},{c[2]},LPS,studies/a.nrrd\n" for c in nodules)
                      + "1,2,3,LPS,studies/b.nrrd\n")
    out = tmp_path / "out"
    assert main(["crop", "--volume", str(studies), "--points", str(points), "--out", str(out)]) == 0
    assert [r["study"] for r in read_index(out)] == ["a.nrrd", "a.nrrd"]
    markups = tmp_path / "m.mrk.json"
    from MedLoRALib.annotations import write_markups
    from MedLoRALib.nodule import Nodule

    write_markups([Nodule(tuple(nodules[0]))], markups)
    code, err = run_cli(capsys, "--volume", studies, "--points", markups, "--out", out)
    assert code == 2 and "does not say which study" in err


def test_crop_and_annotations_stay_torch_free():
    assert_imports_without(["MedLoRALib.annotations", "MedLoRALib.cli.crop", "MedLoRALib.crops", "MedLoRALib.patches"])


# --- the output folder: never lose what crop did not write (issue 11) ------------------------------
def test_out_naming_an_existing_file_is_refused(tmp_path, ct_file, capsys):
    points = points_csv(tmp_path / "points.csv", ct_file[2])
    taken = tmp_path / "results.txt"
    taken.write_text("mine")
    before = tree_digest(tmp_path)
    code, err = run_cli(capsys, "--volume", ct_file[0], "--points", points, "--out", taken)
    assert code == 2 and "is a file" in err and "results.txt" in err and "Traceback" not in err
    assert tree_digest(tmp_path) == before


def test_out_naming_the_working_folder_is_refused(tmp_path, ct_file, capsys, monkeypatch):
    points = points_csv(tmp_path / "points.csv", ct_file[2])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        code, err = run_cli(capsys, "--volume", ct_file[0], "--points", points, "--out", out)
        assert code == 2 and "the folder you are working in" in err
    assert work.is_dir() and not list(work.iterdir())


def test_pixels_beyond_memory_are_refused_up_front(tmp_path, ct_file, capsys):
    points = points_csv(tmp_path / "points.csv", ct_file[2])
    code, err = run_cli(capsys, "--volume", ct_file[0], "--points", points, "--out", tmp_path / "o",
                        "--pixels", "100000")
    assert code == 2 and "Traceback" not in err
    assert "--pixels 100000" in err and "memory" in err and "TiB" in err and "--pixels 2 … " in err
    assert not (tmp_path / "o").exists()
    code, err = run_cli(capsys, "--volume", ct_file[0], "--points", points, "--out", tmp_path / "o",
                        "--views", "cube", "--pixels", "5000")
    assert code == 2 and "--views cube needs about" in err


def test_largest_allowed_pixels_fit_and_one_more_does_not():
    from MedLoRALib.crops import crop_memory_bytes, max_pixels

    for views in ("axial", "multiview9", "cube"):
        largest = max_pixels(views, 2 ** 30)
        assert crop_memory_bytes(views, largest) <= 2 ** 30 < crop_memory_bytes(views, largest + 1)
    assert max_pixels("cube", 2 ** 30) < max_pixels("multiview9", 2 ** 30) < max_pixels("axial", 2 ** 30)


def test_nodules_cut_in_memory_sized_groups_give_the_same_files(tmp_path, ct_file, monkeypatch):
    import MedLoRALib.crops as crops
    from MedLoRALib.nodule import Nodule

    _, ct, centres = ct_file
    nodules = [Nodule(tuple(c), nodule_id=f"n{i}") for i, c in enumerate(centres)]
    job = crops.CropJob("ortho3", 50.0, 16, (-1000.0, 400.0), "npy")
    assert job.nodules_per_cut() >= 2
    together = crops.crop_study(ct, nodules, job, tmp_path, "s", 1)
    monkeypatch.setattr(crops, "memory_limit_bytes", lambda: crops.crop_memory_bytes("ortho3", 16))
    assert job.nodules_per_cut() == 1
    (tmp_path / "one").mkdir()
    one_by_one = crops.crop_study(ct, nodules, job, tmp_path / "one", "s", 1)
    assert together == one_by_one
    for row in together:
        np.testing.assert_array_equal(np.load(tmp_path / row["file"]), np.load(tmp_path / "one" / row["file"]))


def test_out_holding_other_files_is_never_touched(tmp_path, ct_file, capsys):
    points = points_csv(tmp_path / "points.csv", ct_file[2])
    out = tmp_path / "out"
    out.mkdir()
    (out / "0001_left.png").write_bytes(b"a user's picture with crop's file name")
    (out / "notes").mkdir()
    before = tree_digest(out)
    for extra in ([], ["--overwrite"]):
        code, err = run_cli(capsys, "--volume", ct_file[0], "--points", points, "--out", out, *extra)
        assert code == 2 and "holds files crop did not write" in err and "0001_left.png" in err
        assert tree_digest(out) == before and sorted(p.name for p in out.iterdir()) == ["0001_left.png", "notes"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_an_earlier_crop_is_replaced_only_with_overwrite(tmp_path, ct_file, capsys):
    points = points_csv(tmp_path / "points.csv", ct_file[2])
    out = tmp_path / "out"
    assert main(["crop", "--volume", str(ct_file[0]), "--points", str(points), "--out", str(out)]) == 0
    first = tree_digest(out)
    code, err = run_cli(capsys, "--volume", ct_file[0], "--points", points, "--out", out, "--views", "axial")
    assert code == 2 and "--overwrite" in err and "earlier run" in err
    assert tree_digest(out) == first
    one = tmp_path / "one.csv"
    one.write_text(points.read_text().splitlines()[0] + "\n" + points.read_text().splitlines()[1] + "\n")
    assert main(["crop", "--volume", str(ct_file[0]), "--points", str(one), "--out", str(out), "--views", "axial",
                 "--overwrite"]) == 0
    rows = read_index(out)
    assert [r["nodule_id"] for r in rows] == ["left"]
    assert sorted(p.name for p in out.iterdir()) == ["0001_left.png", "index.csv"]  # the earlier 'right' is gone
    with Image.open(out / "0001_left.png") as png:
        assert png.size == (64, 64)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_run_leaves_the_earlier_crops(tmp_path, ct_file, capsys):
    points = points_csv(tmp_path / "points.csv", ct_file[2])
    out = tmp_path / "out"
    assert main(["crop", "--volume", str(ct_file[0]), "--points", str(points), "--out", str(out)]) == 0
    before = tree_digest(out)
    far = tmp_path / "far.csv"
    far.write_text("x,y,z,coordinate_system\n0,0,900,LPS\n")
    code, err = run_cli(capsys, "--volume", ct_file[0], "--points", far, "--out", out, "--overwrite")
    assert code == 2 and "outside the CT volume" in err
    assert tree_digest(out) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unwritable_output_is_a_clear_error(tmp_path, ct_file, capsys):
    import os
    import resource

    points = points_csv(tmp_path / "points.csv", ct_file[2])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: fill the "disk" instead
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            import signal

            previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))
            try:
                code, err = run_cli(capsys, "--volume", ct_file[0], "--points", points, "--out", locked / "o")
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
                signal.signal(signal.SIGXFSZ, previous)
            assert code == 2 and "could not write the crops" in err and "file-size limit" in err
        else:
            code, err = run_cli(capsys, "--volume", ct_file[0], "--points", points, "--out", locked / "o")
            assert code == 2 and "could not write the crops" in err and "ermission denied" in err
        assert "Traceback" not in err and not (locked / "o").exists() and not list(locked.iterdir())
    finally:
        locked.chmod(0o755)


def test_views_help_lists_every_view_set_and_its_planes(capsys):
    from MedLoRALib.patches import VIEW_PLANES

    with pytest.raises(SystemExit):
        main(["crop", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, planes in VIEW_PLANES.items():
        assert f"{name}: {len(planes)} plane" in text and all(plane in text for plane in planes)
    assert "cube: a 3D block" in text and "Default multiview9" in text
