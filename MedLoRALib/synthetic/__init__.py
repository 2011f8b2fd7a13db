"""Synthetic chest CT with known nodules: the embedded data for the demo, tests and pre-training.

One job per module:

* ``config``   — ``PhantomConfig`` (grid, nodule count and sizes) and ``NoduleMix`` (compositions);
* ``shapes``   — directions, rotations and distances shared by every scene;
* ``grid``     — the world position of every voxel centre, so anatomy is drawn in millimetres;
* ``anatomy``  — body, ribs, spine, heart, lungs and branching vessels;
* ``nodules``  — benign-like and malignant-like nodules and where they may go;
* ``scanner``  — point-spread function, correlated noise and 12-bit storage;
* ``phantom``  — ``make_phantom``: the above put together;
* ``measures`` — the size/density shortcut baseline and margin irregularity;
* ``series``   — ``write_dicom_series``;
* ``cohort``   — ``write_cohort``: phantoms and a training manifest;
* ``scenes``   — the analytic patch scenes the tiny backbone is pre-trained on.

The two nodule classes are told apart by shape and texture, not by size or density (DESIGN:
"Synthetic data must not be solvable by a shortcut"). Irregular outlines fill less of the sphere
of the nodule's radius, which would make malignant nodules look dimmer on average; the shares of
bright calcified and dim ground-glass benign nodules (``NoduleMix``) balance that, so a logistic
regression on (diameter, mean HU in the sphere) stays near chance — see ``shortcut_features`` and
``shortcut_auc``. Torch-free.
"""

from __future__ import annotations

from .cohort import MANIFEST_COLUMNS, write_cohort
from .config import NoduleMix, PhantomConfig, oblique_direction
from .measures import margin_irregularity, shortcut_auc, shortcut_features
from .phantom import make_phantom
from .series import write_dicom_series
from .shapes import fibonacci_directions

__all__ = ["MANIFEST_COLUMNS", "NoduleMix", "PhantomConfig", "fibonacci_directions", "make_phantom",
           "margin_irregularity", "oblique_direction", "shortcut_auc", "shortcut_features", "write_cohort",
           "write_dicom_series"]
