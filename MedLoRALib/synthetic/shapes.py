"""Geometric building blocks of the synthetic scenes: directions, rotations, distances to segments.

Shared by the phantom CT (``phantom``) and the pre-training patches (``scenes``). Every
function is deterministic for a given random generator, so cohorts are reproducible.
"""

from __future__ import annotations

import numpy as np


def fibonacci_directions(n: int) -> np.ndarray:
    """(n, 3) unit vectors spread evenly over the sphere."""
    index = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * index / n)
    azimuth = np.pi * (1 + 5 ** 0.5) * index
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q



def random_units(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)



def segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each point (…, 3) to a segment, and the position t ∈ [0, 1] along it."""
    axis = (end - start).astype(points.dtype)
    rel = points - start.astype(points.dtype)
    t = np.clip((rel @ axis) / max(float(axis @ axis), 1e-12), 0.0, 1.0)
    rel -= t[..., None] * axis
    return np.sqrt(np.einsum("...a,...a->...", rel, rel)), t


def distance_to_segments(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(P, S) distances from each of P points to each of S segments."""
    axis = ends - starts
    rel = points[:, None, :] - starts[None]
    t = np.clip(np.einsum("psa,sa->ps", rel, axis) / np.maximum((axis * axis).sum(-1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(rel - t[..., None] * axis[None], axis=-1)
