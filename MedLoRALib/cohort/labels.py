"""Label rules of a cohort: how readers' malignancy ratings (or pathology) become 0/1.

* ``mean`` (default): mean rating ≥ 4 malignant, ≤ 2 benign, anything between (3, 2.5, 3.33 …)
  dropped. The mean uses every rating of the nodule, so one dissenting reader can tip it.
* ``median``: the MedMNIST/LIDC rule of ``annotations.lidc_label`` on the median rating
  (≤ 2 benign, ≥ 4 malignant, 2.5–3.5 dropped).
* ``nlstx``: NLSTx's pathology-confirmed label (biopsy-proven malignant, or benign at follow-up)
  for nodules that come from NLSTx; nodules without it fall back to ``mean``.
"""

from __future__ import annotations

import statistics

from ..annotations import lidc_label
from ..nodule import Nodule

LABEL_RULES = {
    "mean": "mean malignancy rating >= 4 malignant, <= 2 benign, in between dropped",
    "median": "median malignancy rating <= 2 benign, >= 4 malignant, 2.5-3.5 dropped (MedMNIST)",
    "nlstx": "NLSTx pathology-confirmed label where the series is in NLSTx, else the mean rule",
}
DEFAULT_RULE = "mean"


def _mean_label(nodule: Nodule) -> tuple[int | None, str]:
    if not nodule.ratings:
        return None, "no malignancy rating"
    mean = float(statistics.mean(nodule.ratings))
    if mean >= 4:
        return 1, ""
    if mean <= 2:
        return 0, ""
    return None, "mean malignancy between 2 and 4"


def label_nodule(nodule: Nodule, rule: str) -> tuple[int | None, str]:
    """(label, why it is None) of ``nodule`` under ``rule`` (one of ``LABEL_RULES``)."""
    if rule not in LABEL_RULES:
        raise ValueError(f"unknown label rule {rule!r}; choose one of {', '.join(LABEL_RULES)}")
    if nodule.source.startswith("nlstx"):
        if rule == "nlstx" and nodule.label is not None:
            return int(nodule.label), ""
        return None, "NLSTx nodule (no reader ratings): use --label-rule nlstx"
    if rule == "median":
        if not nodule.ratings:
            return None, "no malignancy rating"
        median = float(statistics.median(nodule.ratings))
        label = lidc_label(median)
        return label, "" if label is not None else "median malignancy between 2 and 4"
    return _mean_label(nodule)
