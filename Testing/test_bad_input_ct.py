"""Bad CT input (issue 11, items 8-9, DICOM tracebacks, misleading messages): a specific CTLoadError, never garbage.

Volumes and DICOM series are written for real (SimpleITK, pydicom via the phantom writer) and
damaged the way a broken exporter or a careless copy would; each test checks the error's key
words (which file, what, what to do) and that the input files are unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import tree_digest

from MedLoRALib.ctio import list_series, load_ct, series_key
from MedLoRALib.errors import CTLoadError
from MedLoRALib.geometry import Geometry
from MedLoRALib.image import CTImage
from MedLoRALib.synthetic import write_dicom_series

SIZE = (24, 20, 8)  # i, j, k: small enough that writing a series takes milliseconds


def _volume(spacing=(0.7, 0.8, 2.5), seed: int = 0) -> CTImage:
    voxels = np.random.default_rng(seed).integers(-1000, 400, SIZE[::-1]).astype(np.int16)
    return CTImage(voxels, Geometry(size=SIZE, spacing=spacing, origin_lps=(-10.0, 20.0, -150.0)))


def _refused(path, *words, series_uid=None) -> str:
    """Load ``path``, expect a CTLoadError holding all ``words``, and check no input file changed."""
    root = Path(path).parent if Path(path).is_file() else Path(path)
    before = tree_digest(root)
    with pytest.raises(CTLoadError) as info:
        load_ct(path, series_uid=series_uid)
    message = str(info.value)
    missing = [w for w in words if w not in message]
    assert not missing, f"{missing} not in: {message}"
    assert tree_digest(root) == before
    return message


def _edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for tag, value in tags.items():
        setattr(ds, tag, value)
    ds.save_as(path)


def _set_raw_ds(path: Path, keyword: str, text: bytes) -> None:
    """Write a DS element's raw text (pydicom refuses values such as NaN; a broken exporter does not)."""
    ds = pydicom.dcmread(path)
    ds[keyword].value = "0"  # placeholder of the right VR; replaced below
    raw = pydicom.dataelem.RawDataElement(ds[keyword].tag, "DS", len(text), text, 0, False, True)
    ds._dict[ds[keyword].tag] = raw
    ds.save_as(path)


# --------------------------------------------------------------------------------------------
# Volume files: non-finite voxels, spacing, origin
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, dtype", [(".nii.gz", np.float32), (".nii", np.float64), (".nrrd", np.float32),
                                           (".mha", np.float32)])
def test_non_finite_voxels_are_refused_naming_file_and_count(tmp_path, suffix, dtype):
    """ITK's NIfTI reader turns NaN/inf into 0 on its own: the file itself must be checked."""
    voxels = np.random.default_rng(1).normal(-500, 300, SIZE[::-1]).astype(dtype)
    voxels[1, 2, 3] = voxels[4, 5, 6] = voxels[7, 8, 9] = np.nan
    voxels[0, 0, 0], voxels[2, 2, 2] = np.inf, -np.inf
    image = sitk.GetImageFromArray(voxels)
    sitk.WriteImage(image, str(tmp_path / f"ct{suffix}"))
    _refused(tmp_path / f"ct{suffix}", f"ct{suffix}", "5 non-finite", "3 NaN", "2 infinite", f"out of {voxels.size}",
             "-1024 HU")


def test_finite_float_volume_still_loads(tmp_path):
    voxels = np.random.default_rng(1).normal(-500, 300, SIZE[::-1]).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(load_ct(tmp_path / "ct.nii.gz").voxels_hu, voxels)


@pytest.mark.parametrize("suffix", [".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("spacing, words", [(1e30, ["1e+30", "outside the 0.01-100 mm"]),
                                            (1e-6, ["1e-06", "outside", "another unit"])],
                         ids=["1e30", "metres-like"])
def test_absurd_volume_spacing_is_refused(tmp_path, suffix, spacing, words):
    image = sitk.GetImageFromArray(np.zeros(SIZE[::-1], dtype=np.int16))
    image.SetSpacing((0.7, 0.7, spacing))
    sitk.WriteImage(image, str(tmp_path / f"ct{suffix}"))
    _refused(tmp_path / f"ct{suffix}", f"ct{suffix}", "voxel spacing", "save the volume again", *words)


def _write_mha(folder: Path, header_edit: tuple[bytes, bytes]) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(SIZE[::-1], dtype=np.int16)), str(folder / "ct.mha"))
    path = folder / "ct.mha"
    data = path.read_bytes()
    assert header_edit[0] in data
    path.write_bytes(data.replace(*header_edit, 1))
    return path


@pytest.mark.parametrize("value", [b"0", b"nan", b"inf"])
def test_zero_or_non_finite_spacing_in_a_header_is_named(tmp_path, value):
    path = _write_mha(tmp_path, (b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 1 " + value))
    _refused(path, "ct.mha", "spacing is zero or not a number", "Correct the spacing")


def test_nrrd_with_nan_spacing_is_named(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(SIZE[::-1], dtype=np.int16)), str(tmp_path / "ct.nrrd"))
    path = tmp_path / "ct.nrrd"
    data = path.read_bytes()
    path.write_bytes(re.sub(rb"space directions: \(1,0,0\) \(0,1,0\) \(0,0,1\)",
                            b"space directions: (1,0,0) (0,1,0) (0,0,nan)", data))
    _refused(path, "ct.nrrd", "spacing is zero or not a number")


def test_origin_far_outside_any_scanner_is_refused(tmp_path):
    path = _write_mha(tmp_path, (b"Offset = 0 0 0", b"Offset = 1e30 0 0"))
    _refused(path, "ct.mha", "origin", "corrupt")


# --------------------------------------------------------------------------------------------
# DICOM: PixelSpacing, slice step, a stray MR slice, tied series
# --------------------------------------------------------------------------------------------
@pytest.fixture
def series(tmp_path) -> Path:
    return write_dicom_series(_volume(), tmp_path / "series")


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


@pytest.mark.parametrize("value, reason", [(["0", "0"], "must be positive"), (["0.7", "0"], "must be positive"),
                                           (["-0.7", "-0.7"], "must be positive"),
                                           (["1e30", "1e30"], "outside the 0.01-100 mm")])
def test_bad_pixel_spacing_names_the_file(series, value, reason):
    bad = _files(series)[3]
    _edit(bad, PixelSpacing=value)
    _refused(series, bad.name, "PixelSpacing", reason, "export the series again")


def test_pixel_spacing_zero_in_every_file_is_an_error_not_a_traceback(series):
    for path in _files(series):
        _edit(path, PixelSpacing=["0", "0"])
    _refused(series, "PixelSpacing", "0 × 0 mm", "must be positive")


def test_nan_pixel_spacing_names_the_file(series):
    bad = _files(series)[5]
    _set_raw_ds(bad, "PixelSpacing", b"nan\\nan ")
    _refused(series, bad.name, "PixelSpacing", "not a finite number")


def test_slice_step_of_1e30_is_refused(tmp_path):
    folder = write_dicom_series(_volume(), tmp_path / "series")
    for k, path in enumerate(_files(folder)):
        ds = pydicom.dcmread(path)
        _edit(path, ImagePositionPatient=[ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], f"{k * 1e30:.6g}"])
    _refused(folder, "slice step", "1e+30", "outside")


@pytest.mark.parametrize("position", [0, 4, 7], ids=["first", "middle", "last"])
def test_mr_slice_inside_a_ct_series_is_refused_naming_it(series, position):
    stray = _files(series)[position]
    ds = pydicom.dcmread(stray)
    ds.Modality = "MR"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
    ds.save_as(stray)
    message = _refused(series, "mixes modalities", "1 of its 8 slices are MR", stray.name, "the others CT",
                       "Remove the stray file")
    assert message.count(".dcm") == 1  # only the stray file is named


def test_tied_series_are_listed_not_guessed(tmp_path):
    """Two CT series with the same slice count and step (e.g. two kernels): refused, listed, how to choose."""
    study = tmp_path / "study"
    soft = write_dicom_series(_volume(seed=1), study / "soft", series_uid=pydicom.uid.generate_uid())
    lung = write_dicom_series(_volume(seed=2), study / "lung", series_uid=pydicom.uid.generate_uid())
    listed = list_series(study)
    message = _refused(study, "2 CT series that tie", "most slices, then the thinnest slice step", "--series-uid",
                       "series_uid column", "does not guess", *(s.key for s in listed))
    assert "pick the matching XML" not in message
    for s in listed:
        assert f"{s.uid[:8]}…{s.uid[-8:]}" in message and s.uid not in message  # UIDs shown truncated only
    chosen = load_ct(study, series_uid=listed[1].key)
    expected = _volume(seed=2 if chosen.ids.series_uid == pydicom.dcmread(_files(lung)[0]).SeriesInstanceUID else 1)
    np.testing.assert_array_equal(chosen.voxels_hu, expected.voxels_hu)
    assert soft.exists() and lung.exists()


def test_series_that_differ_in_slice_step_are_not_a_tie(tmp_path):
    write_dicom_series(_volume(spacing=(0.7, 0.8, 2.5), seed=1), tmp_path / "thick",
                       series_uid=pydicom.uid.generate_uid())
    write_dicom_series(_volume(spacing=(0.7, 0.8, 1.25), seed=2), tmp_path / "thin",
                       series_uid=pydicom.uid.generate_uid())
    loaded = load_ct(tmp_path)
    assert loaded.geometry.spacing[2] == pytest.approx(1.25)
    assert series_key(loaded.ids.series_uid) in {s.key for s in list_series(tmp_path)}


@pytest.mark.parametrize("value", [b"0 ", b"nan ", b"inf "])
def test_unusable_rescale_slope_names_the_file(series, value):
    """GDCM reads a zero or NaN RescaleSlope as 1 without a word; MedLoRA refuses it."""
    bad = _files(series)[2]
    _set_raw_ds(bad, "RescaleSlope", value)
    _refused(series, bad.name, "RescaleSlope", "non-zero number", "export the series again")


def test_values_far_outside_hounsfield_units_are_refused(series, tmp_path):
    for path in _files(series):
        _set_raw_ds(path, "RescaleSlope", b"1e30")
    _refused(series, "not Hounsfield units", "rescale slope")
    voxels = np.full(SIZE[::-1], 5e7, dtype=np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(tmp_path / "counts.nrrd"))
    _refused(tmp_path / "counts.nrrd", "counts.nrrd", "5e+07", "not Hounsfield units")
