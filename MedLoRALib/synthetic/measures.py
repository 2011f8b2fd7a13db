"""Measures on a phantom: the size/density shortcut every AUC is reported beside, and margin irregularity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ..errors import MedLoRAError
from ..image import CTImage
from ..nodule import Nodule
from .grid import voxel_box
from .shapes import fibonacci_directions


def _sphere_mean(image: CTImage, centre_lps: np.ndarray, radius: float) -> float:
    geometry = image.geometry
    bounds = voxel_box(geometry, centre_lps, radius)
    if bounds is None:
        raise MedLoRAError(f"nodule at LPS {np.round(centre_lps, 1).tolist()} mm lies outside the image")
    low, high = bounds
    i, j, k = np.meshgrid(*(np.arange(lo, hi) for lo, hi in zip(low, high)), indexing="ij")
    points = geometry.ijk_to_lps(np.stack([i, j, k], axis=-1).reshape(-1, 3))
    values = image.voxels_hu[k.ravel(), j.ravel(), i.ravel()].astype(np.float64)
    dist = np.linalg.norm(points - centre_lps, axis=1)
    inside = dist <= radius
    return float(values[inside].mean() if inside.any() else values[np.argmin(dist)])


def shortcut_features(image: CTImage, nodules: Sequence[Nodule]) -> np.ndarray:
    """(N, 2): each nodule's diameter (mm) and mean HU inside a sphere of its radius.

    A classifier that only sees these two numbers is the shortcut baseline every AUC is
    reported beside.
    """
    rows = []
    for nodule in nodules:
        if nodule.diameter_mm is None or nodule.diameter_mm <= 0:
            raise MedLoRAError(f"nodule {nodule.nodule_id or '(unnamed)'} has no diameter; the shortcut features "
                               "need diameter_mm.")
        rows.append((float(nodule.diameter_mm),
                     _sphere_mean(image, np.asarray(nodule.centre_lps), nodule.diameter_mm / 2.0)))
    return np.asarray(rows, dtype=float).reshape(-1, 2)


def shortcut_auc(features: np.ndarray, labels: Sequence[int], folds: int = 5, seed: int = 0) -> float:
    """ROC AUC of a logistic regression on the shortcut features (cross-validated, out-of-fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels, dtype=int)
    x = np.asarray(features, dtype=float)
    if len(np.unique(y)) < 2 or np.bincount(y).min() < folds:
        raise MedLoRAError(f"the shortcut baseline needs at least {folds} nodules of each class, got {np.bincount(y, minlength=2).tolist()}")
    model = make_pipeline(StandardScaler(), LogisticRegression())
    scores = cross_val_predict(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                               method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def margin_irregularity(image: CTImage, nodule: Nodule, n_rays: int = 300) -> float:
    """Coefficient of variation of the nodule's boundary radius over many rays from its centre.

    The boundary along a ray is where HU first drops below halfway between the nodule's
    centre and the surrounding lung. Smooth round nodules score low; lobulated and
    spiculated ones high.
    """
    if nodule.diameter_mm is None:
        raise MedLoRAError(f"nodule {nodule.nodule_id or '(unnamed)'} needs diameter_mm for margin_irregularity")
    radius = nodule.diameter_mm / 2.0
    centre = np.asarray(nodule.centre_lps, dtype=float)
    steps = np.arange(0.0, 2.5 * radius + 3.0, 0.25)
    rays = fibonacci_directions(n_rays)
    points = centre + rays[:, None, :] * steps[None, :, None]
    ijk = image.geometry.lps_to_ijk(points.reshape(-1, 3))
    values = ndimage.map_coordinates(image.voxels_hu.astype(np.float32), ijk[:, ::-1].T, order=1,
                                     mode="nearest").reshape(len(rays), len(steps))
    inner = np.median(values[:, steps <= max(radius / 3.0, 1.0)])
    outer = np.median(values[:, steps >= 2.0 * radius])
    below = values < 0.5 * (inner + outer)
    boundary = np.where(below.any(axis=1), steps[np.argmax(below, axis=1)], steps[-1])
    return float(boundary.std() / max(boundary.mean(), 1e-6))
