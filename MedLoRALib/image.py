"""The in-memory CT: voxels in Hounsfield units plus their grid in LPS millimetres."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import Geometry

AIR_HU = -1024.0


@dataclass(frozen=True)
class StudyIds:
    """DICOM identifiers needed to match annotations; never printed in logs or reprs."""

    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""

    def __repr__(self) -> str:  # identifiers stay out of logs and tracebacks
        return "StudyIds(<hidden>)"


@dataclass(eq=False)
class CTImage:
    """A CT volume.

    Args:
        voxels_hu: Hounsfield units in ``[k, j, i]`` order (slices, rows, columns),
            rescale slope and intercept already applied.
        geometry: the voxel grid in LPS millimetres.
        ids: patient/study/series identifiers (hidden from repr).
        source: where it was read from (hidden from repr, paths can name patients).
    """

    voxels_hu: np.ndarray
    geometry: Geometry
    ids: StudyIds = field(default_factory=StudyIds, repr=False)
    source: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        expected = tuple(reversed(self.geometry.size))
        if self.voxels_hu.shape != expected:
            raise ValueError(f"voxel array shape {self.voxels_hu.shape} does not match "
                             f"geometry size (i, j, k) = {self.geometry.size}")

    @classmethod
    def from_sitk(cls, image, ids: StudyIds | None = None, source: str = "") -> CTImage:
        """Wrap a SimpleITK image whose pixel values are already HU."""
        import SimpleITK as sitk

        return cls(voxels_hu=sitk.GetArrayFromImage(image), geometry=Geometry.from_sitk(image),
                   ids=ids or StudyIds(), source=source)

    def to_sitk(self):
        """A SimpleITK image with the same voxels and LPS grid."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.voxels_hu))
        self.geometry.apply_to_sitk(image)
        return image
