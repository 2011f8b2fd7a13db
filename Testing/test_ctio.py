"""CT loading: DICOM series (real LIDC and written phantoms), the refusals, and volume files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from MedLoRALib.ctio import list_series, load_ct, save_volume, series_key
from MedLoRALib.errors import CTLoadError, MedLoRAError
from MedLoRALib.geometry import Geometry
from MedLoRALib.image import CTImage
from MedLoRALib.synthetic import PhantomConfig, make_phantom, oblique_direction, write_dicom_series

# A small phantom grid: 2 nodules, anisotropic voxels, 40 slices — about 0.1 s to make.
SMALL = PhantomConfig(size=(128, 112, 40), spacing=(0.9, 1.1, 2.5), n_nodules=2)


@pytest.fixture(scope="module")
def phantom_image() -> CTImage:
    return make_phantom(SMALL, seed=11)[0]


@pytest.fixture(scope="module")
def series_master(tmp_path_factory, phantom_image) -> Path:
    """A clean DICOM series, written once; tests that damage it work on a copy."""
    return write_dicom_series(phantom_image, tmp_path_factory.mktemp("master") / "series", patient_id="SECRET-PID-42")


@pytest.fixture
def series(tmp_path, series_master) -> Path:
    return Path(shutil.copytree(series_master, tmp_path / "series"))


def _files_by_position(folder: Path) -> list[Path]:
    """The series' files sorted by position along the slice normal (as the loader does)."""
    def along(path: Path) -> float:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        return float(np.asarray(ds.ImagePositionPatient, dtype=float) @ np.cross(iop[:3], iop[3:]))
    return sorted(folder.glob("*.dcm"), key=along)


def _assert_same_grid(a: Geometry, b: Geometry, tol: float = 1e-4) -> None:
    assert a.size == b.size
    np.testing.assert_allclose(a.spacing, b.spacing, atol=tol)
    np.testing.assert_allclose(a.origin_lps, b.origin_lps, atol=tol)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol)


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", [None, oblique_direction((10.0, -6.0, 25.0))], ids=["identity", "oblique"])
def test_dicom_round_trip_keeps_voxels_and_geometry(tmp_path, direction):
    config = PhantomConfig(size=(128, 112, 40), spacing=(0.8, 1.15, 2.0), direction=direction, n_nodules=2)
    image = make_phantom(config, seed=3)[0]
    loaded = load_ct(write_dicom_series(image, tmp_path / "ct"))
    assert loaded.voxels_hu.dtype == np.int16
    np.testing.assert_array_equal(loaded.voxels_hu, image.voxels_hu)
    _assert_same_grid(loaded.geometry, image.geometry)
    assert loaded.ids.series_uid == image.ids.series_uid
    assert loaded.ids.patient_id == "PHANTOM"


def test_dicom_round_trip_signed_pixels(tmp_path, phantom_image):
    """Values below -1024 (scanner padding such as -2048) need signed stored pixels."""
    voxels = phantom_image.voxels_hu.copy()
    voxels[:, :4, :4] = -2048
    voxels[:, -2:, -2:] = 3500
    image = CTImage(voxels, phantom_image.geometry)
    folder = write_dicom_series(image, tmp_path / "ct")
    assert pydicom.dcmread(next(folder.glob("*.dcm"))).PixelRepresentation == 1
    np.testing.assert_array_equal(load_ct(folder).voxels_hu, voxels)


def test_single_dicom_file_loads_its_whole_series(series, phantom_image):
    loaded = load_ct(next(series.glob("*.dcm")))
    np.testing.assert_array_equal(loaded.voxels_hu, phantom_image.voxels_hu)


def test_per_slice_rescale_is_applied_to_each_file(series, phantom_image):
    """A slice stored with another intercept must still come back in the same HU."""
    path = _files_by_position(series)[5]
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.int32) - 1000  # HU = stored + intercept, intercept now -24
    ds.RescaleIntercept = "-24"
    ds.PixelRepresentation = 1
    ds.PixelData = stored.astype(np.int16).tobytes()
    ds.save_as(path)
    loaded = load_ct(series)
    assert loaded.voxels_hu.dtype == np.int16
    np.testing.assert_array_equal(loaded.voxels_hu, phantom_image.voxels_hu)


def test_localizer_images_in_the_series_are_left_out(series, phantom_image):
    ds = pydicom.dcmread(next(series.glob("*.dcm")))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(series / "scout.dcm")
    np.testing.assert_array_equal(load_ct(series).voxels_hu, phantom_image.voxels_hu)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_volume_file_round_trip(tmp_path, suffix):
    geometry = Geometry(size=(20, 16, 12), spacing=(0.7, 0.9, 3.0), origin_lps=(-12.5, 40.0, -300.25),
                        direction=np.asarray(oblique_direction((5.0, 10.0, -30.0))).reshape(3, 3))
    rng = np.random.default_rng(0)
    for voxels in (rng.integers(-1024, 2000, (12, 16, 20)).astype(np.int16),
                   rng.normal(-500, 300, (12, 16, 20)).astype(np.float32)):
        path = save_volume(CTImage(voxels, geometry), tmp_path / f"ct{suffix}")
        loaded = load_ct(path)
        assert loaded.voxels_hu.dtype == voxels.dtype
        np.testing.assert_array_equal(loaded.voxels_hu, voxels)
        _assert_same_grid(loaded.geometry, geometry)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ct{suffix}"]  # no temporary files left


def test_integer_valued_float_volume_is_stored_as_int16(tmp_path):
    image = sitk.GetImageFromArray(np.full((4, 5, 6), -1000.0, dtype=np.float64))
    sitk.WriteImage(image, str(tmp_path / "f.nrrd"))
    assert load_ct(tmp_path / "f.nrrd").voxels_hu.dtype == np.int16


def test_save_volume_refuses_unknown_format(tmp_path, phantom_image):
    with pytest.raises(MedLoRAError, match=r"\.nrrd"):
        save_volume(phantom_image, tmp_path / "ct.png")


# --------------------------------------------------------------------------------------------
# Choosing a series
# --------------------------------------------------------------------------------------------
@pytest.fixture
def two_series(tmp_path, phantom_image) -> tuple[Path, CTImage, CTImage]:
    """A study folder with the 40-slice phantom and a shorter, different CT series."""
    shorter = CTImage(phantom_image.voxels_hu[:30, :100, :120].copy(),
                      Geometry(size=(120, 100, 30), spacing=(0.7, 0.7, 1.0), origin_lps=(1.0, 2.0, 3.0)))
    write_dicom_series(phantom_image, tmp_path / "study" / "a", patient_id="SECRET-PID-42")
    write_dicom_series(shorter, tmp_path / "study" / "b", patient_id="SECRET-PID-42",
                       series_uid=pydicom.uid.generate_uid())
    return tmp_path / "study", phantom_image, shorter


def test_default_rule_picks_the_ct_series_with_most_slices_and_names_the_other(two_series, caplog):
    folder, longer, shorter = two_series
    with caplog.at_level(logging.INFO, logger="MedLoRALib.ctio"):
        loaded = load_ct(folder)
    np.testing.assert_array_equal(loaded.voxels_hu, longer.voxels_hu)
    other = next(s for s in list_series(folder) if s.uid != loaded.ids.series_uid)
    assert "30 slices" in caplog.text and other.key in caplog.text and "40 slices" in caplog.text
    assert "SECRET-PID-42" not in caplog.text and other.uid not in caplog.text


def test_series_chosen_by_uid_or_key(two_series):
    folder, _, shorter = two_series
    other = next(s for s in list_series(folder) if len(s.slices) == 30)
    for wanted in (other.uid, other.key):
        loaded = load_ct(folder, series_uid=wanted)
        np.testing.assert_array_equal(loaded.voxels_hu, shorter.voxels_hu)
        assert loaded.geometry.spacing == (0.7, 0.7, 1.0)


def test_absent_series_uid_lists_what_is_there(two_series):
    folder, _, _ = two_series
    listed = list_series(folder)
    with pytest.raises(CTLoadError) as info:
        load_ct(folder, series_uid="1.2.3.4.5")
    message = str(info.value)
    assert series_key("1.2.3.4.5") in message
    assert all(s.key in message for s in listed) and "series 2 of 2" in message
    assert "40 slices" in message and "30 slices" in message
    assert "SECRET-PID-42" not in message and not any(s.uid in message for s in listed)


def test_tie_on_slice_count_goes_to_the_thinner_slices(tmp_path, phantom_image):
    thick = phantom_image
    thin = CTImage(phantom_image.voxels_hu, Geometry(size=thick.geometry.size, spacing=(0.9, 1.1, 1.25),
                                                     origin_lps=thick.geometry.origin_lps))
    write_dicom_series(thick, tmp_path / "thick")
    write_dicom_series(thin, tmp_path / "thin", series_uid=pydicom.uid.generate_uid())
    assert load_ct(tmp_path).geometry.spacing[2] == pytest.approx(1.25)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
def test_missing_slice_names_the_gap(series):
    files = _files_by_position(series)
    before = pydicom.dcmread(files[19], stop_before_pixels=True)
    files[20].unlink()
    with pytest.raises(CTLoadError, match="missing slices") as info:
        load_ct(series)
    z_before = float(before.ImagePositionPatient[2])
    message = str(info.value)
    assert f"{z_before:.2f}" in message and f"{z_before + 5.0:.2f}" in message  # the gap: 5 mm instead of 2.5
    assert "about 1 slice(s) missing" in message and files[19].name in message


def test_duplicated_slice_is_refused(series):
    files = _files_by_position(series)
    shutil.copy(files[7], series / "copy_of_slice.dcm")
    with pytest.raises(CTLoadError, match="duplicated slices"):
        load_ct(series)


def test_non_uniform_spacing_is_refused(series):
    path = _files_by_position(series)[10]
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                               str(float(ds.ImagePositionPatient[2]) + 0.8)]
    ds.save_as(path)
    with pytest.raises(CTLoadError, match="non-uniform slice spacing"):
        load_ct(series)


def test_gantry_tilt_is_refused_with_its_angle(series):
    files = _files_by_position(series)
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.4f}", f"{y + k * 2.5 * np.tan(np.radians(15.0)):.4f}", f"{z:.4f}"]
        ds.save_as(path)
    with pytest.raises(CTLoadError, match="gantry tilt of about 15.0°") as info:
        load_ct(series)
    assert "resample" in str(info.value).lower()


def test_non_ct_modality_is_refused(tmp_path, phantom_image):
    write_dicom_series(phantom_image, tmp_path / "mr", modality="MR")
    with pytest.raises(CTLoadError, match="no CT image series") as info:
        load_ct(tmp_path / "mr")
    assert "MR, 40 slices" in str(info.value)


def test_requested_series_that_is_not_ct_is_refused(tmp_path, phantom_image):
    write_dicom_series(phantom_image, tmp_path / "mr", modality="MR")
    uid = list_series(tmp_path / "mr")[0].uid
    with pytest.raises(CTLoadError, match="not a CT image volume"):
        load_ct(tmp_path / "mr", series_uid=uid)


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(CTLoadError, match="no DICOM files"):
        load_ct(tmp_path)


def test_garbage_dicom_file_is_named(series):
    (series / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff\x13" * 300)
    with pytest.raises(CTLoadError, match="broken.dcm"):
        load_ct(series)


def test_truncated_pixel_data_names_the_file(series):
    path = _files_by_position(series)[12]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])
    with pytest.raises(CTLoadError, match="corrupt or truncated") as info:
        load_ct(series)
    assert path.name in str(info.value)


def test_nonexistent_path_is_refused(tmp_path):
    with pytest.raises(CTLoadError, match="does not exist"):
        load_ct(tmp_path / "nowhere")


def test_single_slice_series_is_refused_as_2d(tmp_path, phantom_image):
    one = CTImage(phantom_image.voxels_hu[:1].copy(), Geometry(size=(128, 112, 1), spacing=(0.9, 1.1, 2.5),
                                                             origin_lps=(0.0, 0.0, 0.0)))
    write_dicom_series(one, tmp_path / "one")
    with pytest.raises(CTLoadError, match="single slice: a 2D image"):
        load_ct(tmp_path / "one")


def test_2d_volume_file_is_refused(tmp_path):
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    with pytest.raises(CTLoadError, match="2D image"):
        load_ct(tmp_path / "slice.nrrd")


def test_corrupt_volume_file_is_refused(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(CTLoadError, match="bad.nii.gz"):
        load_ct(tmp_path / "bad.nii.gz")


def test_other_file_types_are_refused(tmp_path):
    (tmp_path / "table.csv").write_text("x,y,z\n")
    with pytest.raises(CTLoadError, match="neither DICOM nor a supported volume"):
        load_ct(tmp_path / "table.csv")


# --------------------------------------------------------------------------------------------
# Real LIDC data
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, slices, pixel_mm", [("lidc_0001", 133, 0.703125), ("lidc_0003", 140, 0.820312)])
def test_real_lidc_series_load(request, case, slices, pixel_mm):
    folder = request.getfixturevalue(case)
    image = load_ct(folder)
    assert image.geometry.size == (512, 512, slices)
    np.testing.assert_allclose(image.geometry.spacing, (pixel_mm, pixel_mm, 2.5), atol=1e-6)
    np.testing.assert_allclose(image.geometry.direction, np.eye(3), atol=1e-6)
    assert image.voxels_hu.dtype == np.int16
    assert image.voxels_hu.min() >= -3024
    anterior_air = np.median(image.voxels_hu[:, 20:60, 200:312])  # rows in front of the chest
    assert -1050 < anterior_air < -950
    assert image.ids.series_uid == folder.name
    assert image.ids.patient_id == folder.parents[1].name
    assert "LIDC" not in repr(image) and folder.name not in repr(image)


@pytest.mark.slow  # about 4 s on 2 busy cores: reads a whole LIDC series twice
def test_real_lidc_matches_simpleitk_reading(lidc_0003):
    """Our own sorting and geometry agree with GDCM's on a real scanner series."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(lidc_0003)))
    reference = reader.Execute()
    image = load_ct(lidc_0003)
    np.testing.assert_array_equal(image.voxels_hu, sitk.GetArrayViewFromImage(reference))
    _assert_same_grid(image.geometry, Geometry.from_sitk(reference))
