"""Augmented nodule patches, cut on the fly with one interpolation (numpy, no torch).

Rotation, flips and shift all move the *sampling frame*, so an augmented patch is still
a single trilinear interpolation of the original voxels (see ``patches.extract_patches``).
Every random draw comes from ``(seed, epoch, sample index)``: a sample's augmentation
does not depend on batch order, worker count, DDP rank or whether the run was resumed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..image import CTImage
from ..patches import IMAGENET_GREY_STD, PatchSpec, extract_patches


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation.

    Args:
        rotation_deg: largest rotation angle of the sampling frame about a random axis;
            180 draws uniformly over all 3D rotations; 0 disables.
        flip: mirror the frame along each LPS axis with probability 1/2.
        shift_mm: largest displacement of the centre (uniform in a ball), for imprecise clicks.
        intensity_scale: contrast jitter, a factor drawn from 1 ± this.
        intensity_shift_hu: brightness jitter in HU, drawn from ± this.
        noise_hu: standard deviation of added Gaussian noise in HU.
    """

    rotation_deg: float = 180.0
    flip: bool = True
    shift_mm: float = 2.0
    intensity_scale: float = 0.05
    intensity_shift_hu: float = 20.0
    noise_hu: float = 10.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(rotation_deg=0.0, flip=False, shift_mm=0.0, intensity_scale=0.0,
                   intensity_shift_hu=0.0, noise_hu=0.0)


def patch_reach_mm(spec: PatchSpec, augment: AugmentConfig) -> float:
    """Farthest any sample can lie from a nodule centre (to crop volumes safely)."""
    half = spec.fov_mm / 2.0
    # a plane's corner is √2·half from the centre, a cube's √3·half, however they are rotated
    corner = half * (np.sqrt(3.0) if spec.views == "cube" else np.sqrt(2.0))
    return float(corner + augment.shift_mm)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(index), 0xA06])


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation about a uniformly random axis; uniform over SO(3) when max_deg >= 180."""
    if max_deg >= 180.0:
        q = rng.normal(size=4)
        w, x, y, z = q / np.linalg.norm(q)
        return np.array([
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _hu_to_patch_units(spec: PatchSpec) -> float:
    """Multiply a HU difference by this to express it in the patch's value units."""
    if spec.window_hu is None:
        return 1.0
    scale = 1.0 / (spec.window_hu[1] - spec.window_hu[0])
    return scale / IMAGENET_GREY_STD if spec.normalisation == "imagenet" else scale


def cut_patch(image: CTImage, centre_lps: tuple[float, float, float], spec: PatchSpec,
              augment: AugmentConfig | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """One patch (``spec.shape``, float32); augmented when ``augment`` and ``rng`` are given.

    Without augmentation this is exactly the patch the scoring engine cuts.
    """
    centre = np.asarray(centre_lps, dtype=float)
    if augment is None or rng is None:
        return extract_patches(image, centre[None], spec)[0]
    frame = np.eye(3)
    if augment.rotation_deg > 0:
        frame = random_rotation(rng, augment.rotation_deg)
    if augment.flip:
        frame = frame @ np.diag(np.where(rng.random(3) < 0.5, -1.0, 1.0))
    if augment.shift_mm > 0:
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        centre = centre + direction * augment.shift_mm * rng.random() ** (1.0 / 3.0)
    patch = extract_patches(image, centre[None], spec, rotations=frame[None], require_inside=False)[0]
    units = _hu_to_patch_units(spec)
    if augment.intensity_scale > 0 or augment.intensity_shift_hu > 0:
        mid = 0.0 if spec.window_hu is None else float(patch.mean())
        factor = 1.0 + rng.uniform(-augment.intensity_scale, augment.intensity_scale)
        offset = rng.uniform(-augment.intensity_shift_hu, augment.intensity_shift_hu) * units
        patch = (patch - mid) * factor + mid + offset
    if augment.noise_hu > 0:
        patch = patch + rng.normal(0.0, augment.noise_hu * units, size=patch.shape)
    return patch.astype(np.float32, copy=False)
