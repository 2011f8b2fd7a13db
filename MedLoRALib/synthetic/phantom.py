"""A synthetic chest CT and its nodules, put together from anatomy, nodules and the scanner.

The anatomy is defined in world LPS millimetres and evaluated at the world position of
every voxel centre, so a nodule at ``centre_lps`` is really there whatever the grid's
spacing or (oblique) direction. The scanner's blur and noise are applied afterwards, on
the voxel grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..errors import MedLoRAError
from ..image import CTImage, StudyIds
from ..nodule import Nodule
from .anatomy import Anatomy, body_hu, draw_vessels, vessel_tree
from .config import PhantomConfig
from .grid import Grid
from .nodules import NoduleShape, balanced_labels, draw_nodule, place_nodules
from .scanner import apply_scanner

log = logging.getLogger(__name__)


def make_phantom(config: PhantomConfig | None = None, seed: int | None = None, *, case_id: str = "PHANTOM",
                 labels: Sequence[int] | None = None) -> tuple[CTImage, list[Nodule]]:
    """A synthetic chest CT and its nodules (deterministic for a seed).

    Args:
        config: grid and content; defaults to ``PhantomConfig()``.
        seed: overrides ``config.seed``.
        case_id: patient id written into the image ids and the nodule records.
        labels: the nodules' labels (0/1) in order; by default ``config.n_nodules`` with
            ``malignant_fraction`` malignant, in random order.
    """
    return _make(config or PhantomConfig(), seed, case_id, labels)[:2]


def _make(config: PhantomConfig, seed: int | None, case_id: str,
          labels: Sequence[int] | None) -> tuple[CTImage, list[Nodule], list[NoduleShape]]:
    from pydicom.uid import generate_uid

    seed = config.seed if seed is None else int(seed)
    rng = np.random.default_rng(seed)
    geometry = config.geometry()
    body_centre = geometry.ijk_to_lps((np.asarray(geometry.size) - 1) / 2.0)
    anatomy = Anatomy.for_field_of_view(np.asarray(geometry.size) * np.asarray(geometry.spacing), rng)
    grid = Grid(geometry, body_centre)
    hu, lung = body_hu(anatomy, *grid.coords, rng, config.ribs)
    segments = vessel_tree(anatomy, rng) if config.vessels else []
    draw_vessels(hu, lung, grid, segments)
    labels = list(labels) if labels is not None else balanced_labels(config.n_nodules, config.malignant_fraction, rng)
    if any(label not in (0, 1) for label in labels):
        raise MedLoRAError(f"nodule labels must be 0 or 1, got {labels}")
    shapes = place_nodules(config, anatomy, grid, rng, labels, segments)
    for shape in shapes:
        draw_nodule(hu, grid, shape, rng, config.mix)
    voxels = apply_scanner(hu, geometry.spacing, config.noise_hu, rng)
    ids = StudyIds(patient_id=case_id, study_uid=generate_uid(entropy_srcs=[case_id, str(seed), "study"]),
                   series_uid=generate_uid(entropy_srcs=[case_id, str(seed), "series"]))
    image = CTImage(voxels_hu=voxels, geometry=geometry, ids=ids, source=f"phantom:{case_id}:seed={seed}")
    nodules = [Nodule(centre_lps=tuple(shape.centre_lps), nodule_id=f"{case_id}/n{n + 1}", case_id=case_id,
                      series_uid=ids.series_uid, diameter_mm=round(2 * shape.radius, 3), label=shape.label,
                      source="phantom") for n, shape in enumerate(shapes)]
    log.debug("phantom %s: %s", case_id, ", ".join(f"{s.kind} {2 * s.radius:.1f} mm" for s in shapes))
    return image, nodules, shapes
