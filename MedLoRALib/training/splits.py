"""Train/validation splits by patient, never by nodule.

Nodules of one patient are correlated (same scanner, same lungs, often the same reader), so
all of a patient's nodules go to one side. Splits are stratified as far as whole patients
allow: the validation set's malignant fraction is kept close to the cohort's, and every
validation and training set holds both classes (otherwise AUC is undefined) — or the split
is refused with a message saying what is missing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import DatasetError

_HOLDOUT_TRIES = 256


@dataclass(frozen=True)
class Split:
    """Indices into the sample list."""

    train: np.ndarray
    val: np.ndarray
    name: str = "holdout"


def _groups(patient_ids: list[str], labels: np.ndarray) -> tuple[np.ndarray, dict[str, list[int]]]:
    labels = np.asarray(labels).astype(int)
    if len(patient_ids) != len(labels):
        raise ValueError("one patient id per label is needed")
    members: dict[str, list[int]] = defaultdict(list)
    for index, pid in enumerate(patient_ids):
        members[pid].append(index)
    return labels, members


def _has_both(labels: np.ndarray, indices: np.ndarray) -> bool:
    return len(np.unique(labels[indices])) == 2


def holdout_split(patient_ids: list[str], labels: np.ndarray, val_fraction: float, seed: int) -> Split:
    """About ``val_fraction`` of the nodules, as whole patients, held out for validation.

    Among a fixed number of seeded random patient orders, the one whose validation set is
    closest to the wanted size and to the cohort's malignant fraction is taken.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    labels, members = _groups(patient_ids, labels)
    patients = sorted(members)
    if len(patients) < 2:
        raise DatasetError(f"only {len(patients)} patient(s): a split by patient needs at least 2 patients")
    n, target_rate = len(labels), labels.mean()
    rng = np.random.default_rng([seed, 0x5EED])
    best, best_cost = None, np.inf
    for _ in range(_HOLDOUT_TRIES):
        val: list[int] = []
        for p in rng.permutation(len(patients)):
            if len(val) >= val_fraction * n:
                break
            val.extend(members[patients[p]])
        val_idx = np.array(sorted(val))
        train_idx = np.setdiff1d(np.arange(n), val_idx)
        if not (_has_both(labels, val_idx) and _has_both(labels, train_idx)):
            continue
        cost = abs(len(val_idx) / n - val_fraction) + abs(labels[val_idx].mean() - target_rate)
        if cost < best_cost:
            best, best_cost = (train_idx, val_idx), cost
    if best is None:
        raise DatasetError(_cannot_split(labels, members, "a train/validation split"))
    return Split(train=best[0], val=best[1])


def kfold_splits(patient_ids: list[str], labels: np.ndarray, folds: int, seed: int) -> list[Split]:
    """Stratified K-fold over patients (scikit-learn's StratifiedGroupKFold); each patient validated once."""
    if folds < 2:
        raise DatasetError(f"--folds must be at least 2, got {folds}")
    labels, members = _groups(patient_ids, labels)
    if len(members) < folds:
        raise DatasetError(f"{folds}-fold cross-validation by patient needs at least {folds} patients, "
                           f"the manifest has {len(members)}; use fewer folds or --val-fraction")
    groups = np.empty(len(labels), dtype=int)
    for number, pid in enumerate(sorted(members)):
        groups[members[pid]] = number
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed % (2 ** 32))
    splits = []
    for k, (train, val) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        if not (_has_both(labels, val) and _has_both(labels, train)):
            raise DatasetError(_cannot_split(labels, members, f"{folds}-fold cross-validation"))
        splits.append(Split(train=np.sort(train), val=np.sort(val), name=f"fold{k + 1}"))
    return splits


def _cannot_split(labels: np.ndarray, members: dict[str, list[int]], what: str) -> str:
    with_malignant = sum(1 for idx in members.values() if labels[idx].max() == 1)
    with_benign = sum(1 for idx in members.values() if labels[idx].min() == 0)
    return (f"{what} by patient cannot give every training and validation set both classes: "
            f"{with_malignant} of {len(members)} patients have a malignant nodule and {with_benign} a "
            "benign one. Add cases, use fewer folds, or a different --val-fraction.")
