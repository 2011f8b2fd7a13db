"""Writing a CT as a DICOM series that ``ctio.load_ct`` reads back voxel for voxel."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import make_dir_public, replace_dir
from ..errors import MedLoRAError
from ..image import CTImage


def _stored_pixels(voxels_hu: np.ndarray) -> tuple[np.ndarray, int]:
    """Stored values and PixelRepresentation for intercept -1024, slope 1 (as scanners do)."""
    if not np.issubdtype(voxels_hu.dtype, np.integer):
        if not np.array_equal(voxels_hu, np.round(voxels_hu)):
            raise MedLoRAError("DICOM CT stores whole Hounsfield units, but this image has fractional values "
                               "(e.g. after resampling). Round it first, or save it as NRRD/NIfTI instead.")
    lo, hi = int(voxels_hu.min()), int(voxels_hu.max())
    if lo >= -1024 and hi <= 65535 - 1024:
        return (voxels_hu.astype(np.int32) + 1024).astype(np.uint16), 0
    if lo >= -32768 - 1024 and hi <= 32767 - 1024:
        return (voxels_hu.astype(np.int32) + 1024).astype(np.int16), 1
    raise MedLoRAError(f"HU range {lo}…{hi} does not fit 16-bit DICOM pixels; save the image as NRRD/NIfTI instead.")


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value) + 0.0)


def write_dicom_series(image: CTImage, folder: str | os.PathLike, *, patient_id: str = "PHANTOM",
                       study_uid: str | None = None, series_uid: str | None = None, modality: str = "CT",
                       overwrite: bool = False) -> Path:
    """Write ``image`` as a DICOM series, one file per slice, into ``folder`` (created atomically).

    Geometry goes into ImagePositionPatient / ImageOrientationPatient / PixelSpacing, voxels as
    16-bit stored values with RescaleIntercept -1024 and slope 1, so ``load_ct`` reads back the
    same voxels and grid. UIDs default to the image's own ids, else fresh ones.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise MedLoRAError(f"{folder} already holds files; choose an empty folder or pass overwrite=True.")
    stored, representation = _stored_pixels(image.voxels_hu)
    geometry = image.geometry
    study_uid = study_uid or image.ids.study_uid or generate_uid()
    series_uid = series_uid or image.ids.series_uid or generate_uid()
    frame_uid = generate_uid(entropy_srcs=[series_uid, "frame"])
    row_dir, col_dir, slice_dir = geometry.direction.T
    spacing_i, spacing_j, spacing_k = geometry.spacing
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    make_dir_public(staging)
    try:
        for k in range(geometry.size[2]):
            sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)])
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            ds.preamble = b"\0" * 128
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.PatientID, ds.PatientName = patient_id, patient_id
            ds.Modality, ds.ImageType = modality, ["DERIVED", "SECONDARY", "AXIAL"]
            ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
            ds.SeriesDescription = "MedLoRA synthetic chest CT"
            ds.ImagePositionPatient = [_ds(v) for v in geometry.ijk_to_lps(np.array([0.0, 0.0, k]))]
            ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
            ds.PixelSpacing = [_ds(spacing_j), _ds(spacing_i)]  # between rows, between columns
            ds.SliceThickness = _ds(spacing_k)
            ds.SpacingBetweenSlices = _ds(spacing_k)
            ds.Rows, ds.Columns = geometry.size[1], geometry.size[0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, representation
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
            ds.WindowCenter, ds.WindowWidth = "-600", "1500"
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            ds.save_as(staging / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
        replace_dir(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder
