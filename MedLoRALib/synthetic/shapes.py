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



def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def random_unit(rng: np.random.Generator) -> np.ndarray:
    """One random direction (3,)."""
    return unit(rng.normal(size=3))


def perpendicular(rng: np.random.Generator, axis: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to the unit vector ``axis``."""
    v = rng.normal(size=3)
    return unit(v - v.dot(axis) * axis)


def random_units(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) random directions."""
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)



def segment_distance_sq(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared distance from each point (…, 3) to a segment, and the position t ∈ [0, 1] along it."""
    axis = (end - start).astype(points.dtype)
    rel = points - start.astype(points.dtype)
    t = np.clip((rel @ axis) / max(float(axis @ axis), 1e-12), 0.0, 1.0)
    rel -= t[..., None] * axis
    return np.einsum("...a,...a->...", rel, rel), t


def segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each point (…, 3) to a segment, and the position t ∈ [0, 1] along it."""
    squared, t = segment_distance_sq(points, start, end)
    return np.sqrt(squared), t


def polyline_distance(points: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Distance from each point (N, 3) to a path through ``nodes`` (K, 3)."""
    squared = segment_distance_sq(points, nodes[0], nodes[1])[0]
    for i in range(1, len(nodes) - 1):
        np.minimum(squared, segment_distance_sq(points, nodes[i], nodes[i + 1])[0], out=squared)
    return np.sqrt(squared)


def distance_to_segments(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(P, S) distances from each of P points to each of S segments."""
    axis = ends - starts
    rel = points[:, None, :] - starts[None]
    t = np.clip(np.einsum("psa,sa->ps", rel, axis) / np.maximum((axis * axis).sum(-1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(rel - t[..., None] * axis[None], axis=-1)
