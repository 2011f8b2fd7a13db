"""Analytic scenes for pre-training: a named anatomical structure at the centre of a patch.

The pretext task of the tiny backbone (``training/pretrain.py``): lung parenchyma, vessel,
vessel bifurcation, airway, pleura/chest wall, or nodule. Nodules of every shape and
composition (smooth, lobulated, spiculated; solid, ground-glass, part-solid, calcified) are
all just "nodule": the labels never say anything about malignancy.

Each scene is built from soft-edged tubes, ellipsoids and half-spaces in millimetres,
distractor vessels and smooth parenchyma variation, evaluated at given sample points (the
points ``patches.extract_patches`` would sample), so any view of it is one evaluation.
"""

from __future__ import annotations

import numpy as np

from .shapes import perpendicular, polyline_distance, random_unit

STRUCTURES = ("parenchyma", "vessel", "bifurcation", "airway", "pleura", "nodule")


def paint(hu: np.ndarray, sdf: np.ndarray, value: float, edge_mm: float) -> None:
    """Blend ``value`` in where the signed distance is negative, with a soft (partial-volume) edge."""
    occupancy = 0.5 * (1.0 - np.tanh(np.clip(sdf / (2.0 * edge_mm), -20.0, 20.0)))
    hu += occupancy * (value - hu)


def curved_path(rng: np.random.Generator, through: np.ndarray, direction: np.ndarray,
                 half_length: float = 45.0, bend: float = 0.004) -> np.ndarray:
    """Three nodes of a gently bent vessel/airway path through ``through``."""
    normal = perpendicular(rng, direction)
    s = np.linspace(-half_length, half_length, 3)
    curvature = rng.uniform(-bend, bend)
    return through + s[:, None] * direction + (curvature * s ** 2)[:, None] * normal


class Scene:
    """HU values at a set of sample points, built up structure by structure."""

    def __init__(self, points: np.ndarray, rng: np.random.Generator) -> None:
        self.points = points
        self.rng = rng
        self.edge = rng.uniform(0.35, 0.8)  # mm: blur of the scanner + interpolation
        base = rng.uniform(-900.0, -820.0)
        waves = np.zeros(len(points))
        for _ in range(3):  # smooth parenchyma density variation (gravity, perfusion)
            k = random_unit(rng) * 2 * np.pi / rng.uniform(15.0, 60.0)
            waves += rng.uniform(0.0, 20.0) * np.cos(points @ k + rng.uniform(0, 2 * np.pi))
        self.hu = base + waves

    def vessel(self, nodes: np.ndarray, radius: float, value: float | None = None) -> None:
        value = self.rng.uniform(-10.0, 70.0) if value is None else value
        paint(self.hu, polyline_distance(self.points, nodes) - radius, value, self.edge)

    def distractors(self, keep_clear_mm: float) -> None:
        """Small vessels that pass no closer than ``keep_clear_mm`` to the centre."""
        for _ in range(self.rng.poisson(2.5)):
            direction = random_unit(self.rng)
            radius = self.rng.uniform(0.5, 2.5)
            offset = perpendicular(self.rng, direction) * (keep_clear_mm + radius + self.rng.uniform(2.0, 22.0))
            self.vessel(curved_path(self.rng, offset, direction, bend=0.002), radius)

    def pleura(self, distance_mm: float, normal: np.ndarray) -> None:
        """Chest wall beyond the plane ``x·normal = distance``: fat layer, muscle, ribs."""
        depth = self.points @ normal - distance_mm
        fat = self.rng.uniform(1.0, 4.0)
        paint(self.hu, -depth, self.rng.uniform(-120.0, -70.0), self.edge)
        paint(self.hu, fat - depth, self.rng.uniform(20.0, 60.0), self.edge)
        along = perpendicular(self.rng, normal)
        across = np.cross(normal, along)
        rib_depth = fat + self.rng.uniform(4.0, 10.0)
        for shift in self.rng.uniform(-30, 30) + np.array([-24.0, 0.0, 24.0]):
            centre = normal * (distance_mm + rib_depth) + across * shift
            self.vessel(np.stack([centre - 60 * along, centre + 60 * along]), self.rng.uniform(3.5, 6.0),
                        value=self.rng.uniform(300.0, 800.0))

    def airway(self, offset: np.ndarray, direction: np.ndarray) -> None:
        lumen = self.rng.uniform(1.5, 6.0)
        wall = self.rng.uniform(0.6, 2.0)
        nodes = curved_path(self.rng, offset, direction, bend=0.002)
        distance = polyline_distance(self.points, nodes)
        paint(self.hu, distance - lumen - wall, self.rng.uniform(-60.0, 50.0), self.edge)
        paint(self.hu, distance - lumen, self.rng.uniform(-1010.0, -960.0), self.edge)
        artery = lumen * self.rng.uniform(0.6, 1.2)  # the bronchovascular bundle's companion artery
        beside = perpendicular(self.rng, direction) * (lumen + wall + artery + self.rng.uniform(0.5, 2.0))
        self.vessel(nodes + beside, artery)

    def nodule(self, centre: np.ndarray) -> None:
        rng = self.rng
        radius = rng.uniform(2.5, 14.0)
        frame = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        semi_axes = np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)])
        lobes = [(random_unit(rng), rng.uniform(-0.3, 0.3), rng.uniform(0.05, 0.4))
                 for _ in range(rng.integers(0, 7))]

        def surface_radius(unit: np.ndarray) -> np.ndarray:
            local = unit @ frame
            r = radius / np.sqrt(np.sum((local / semi_axes) ** 2, axis=-1))
            for axis, amplitude, width in lobes:
                r = r * (1.0 + amplitude * np.exp((unit @ axis - 1.0) / width))
            return r

        rel = self.points - centre
        dist = np.linalg.norm(rel, axis=1)
        sdf = dist - surface_radius(rel / np.maximum(dist, 1e-6)[:, None])
        kind = rng.choice(["solid", "ground-glass", "part-solid", "calcified"], p=[0.55, 0.15, 0.2, 0.1])
        solid = rng.uniform(-80.0, 80.0)
        value = rng.uniform(-720.0, -350.0) if kind in ("ground-glass", "part-solid") else solid
        paint(self.hu, sdf, value, self.edge)
        if kind == "part-solid":
            core = rng.uniform(0.3, 0.7)
            paint(self.hu, dist - core * surface_radius(rel / np.maximum(dist, 1e-6)[:, None]), solid, self.edge)
        elif kind == "calcified":
            offset = random_unit(rng) * rng.uniform(0.0, 0.4) * radius
            paint(self.hu, np.linalg.norm(rel - offset, axis=1) - rng.uniform(0.15, 0.5) * radius,
                   rng.uniform(350.0, 900.0), self.edge)
        for _ in range(rng.integers(0, 10) if rng.random() < 0.4 else 0):  # spicules
            unit = random_unit(rng)
            base = float(surface_radius(unit[None])[0])
            self.vessel(np.stack([centre + 0.7 * base * unit, centre + (base + rng.uniform(2.0, 12.0)) * unit]),
                        rng.uniform(0.3, 0.9), value=value)
        if rng.random() < 0.4:  # a vessel running into the nodule
            direction = random_unit(rng)
            self.vessel(np.stack([centre, centre + direction * 60.0]), rng.uniform(0.7, 2.5))



def structure_hu(points: np.ndarray, structure: int, rng: np.random.Generator) -> np.ndarray:
    """HU at ``points`` (N, 3) mm of a scene whose origin shows ``STRUCTURES[structure]``."""
    scene = Scene(points, rng)
    name = STRUCTURES[structure]
    jitter = rng.normal(scale=0.7, size=3)
    if name == "parenchyma":
        scene.distractors(keep_clear_mm=5.0)
    elif name == "vessel":
        scene.distractors(keep_clear_mm=8.0)
        radius = rng.uniform(1.0, 4.5)
        scene.vessel(curved_path(rng, jitter * min(1.0, radius / 2), random_unit(rng)), radius)
    elif name == "bifurcation":
        scene.distractors(keep_clear_mm=10.0)
        parent = random_unit(rng)
        radius = rng.uniform(1.5, 4.5)
        scene.vessel(np.stack([jitter, jitter - parent * 60.0]), radius)
        bend_axis = perpendicular(rng, parent)
        for sign in (-1.0, 1.0):
            angle = np.deg2rad(rng.uniform(20.0, 60.0)) * sign
            child = parent * np.cos(angle) + np.cross(bend_axis, parent) * np.sin(angle)
            scene.vessel(np.stack([jitter, jitter + child * 60.0]), radius * rng.uniform(0.6, 0.9))
    elif name == "airway":
        scene.distractors(keep_clear_mm=10.0)
        scene.airway(jitter, random_unit(rng))
    elif name == "pleura":
        scene.distractors(keep_clear_mm=5.0)
        scene.pleura(rng.uniform(-8.0, 8.0), random_unit(rng))
    else:
        scene.distractors(keep_clear_mm=6.0)
        centre = jitter * 2.0
        if rng.random() < 0.15:  # juxta-pleural
            scene.pleura(rng.uniform(3.0, 16.0), random_unit(rng))
        scene.nodule(centre)
    return scene.hu
