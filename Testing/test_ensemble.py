"""Combining several adapters' probabilities: mean, spread, disagreement; which sets may be combined."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from MedLoRALib.adapters.manifest import AdapterManifest
from MedLoRALib.ensemble import check_compatible, combine
from MedLoRALib.errors import AdapterError
from MedLoRALib.patches import PatchSpec


def test_combine_mean_spread_and_disagreement():
    p = np.array([[0.9, 0.2, 0.6],
                  [0.7, 0.1, 0.4],
                  [0.8, 0.3, 0.5]])
    out = combine(p, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(out.probability, [0.8, 0.2, 0.5])
    np.testing.assert_allclose(out.spread, np.std(p, axis=0))
    assert out.disagree.tolist() == [False, False, True]  # 0.6 and 0.5 ≥ 0.5, 0.4 is not
    assert out.labels(["benign", "malignant"]) == ["malignant", "benign", "malignant"]


def test_combine_uses_each_adapters_threshold():
    out = combine(np.array([[0.6], [0.6]]), [0.5, 0.7])  # the same probability, labelled differently
    assert out.disagree.tolist() == [True]
    assert out.threshold == pytest.approx(0.6)


def test_combine_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one threshold per adapter"):
        combine(np.ones((2, 3)), [0.5])


def _manifest(**changes) -> AdapterManifest:
    return dataclasses.replace(AdapterManifest(name="a", backbone="vit_tiny", backbone_sha256="x" * 64), **changes)


def test_only_adapters_reading_the_same_patches_of_the_same_backbone_combine():
    check_compatible({"a": _manifest(), "b": _manifest(name="b", threshold=0.3)})
    with pytest.raises(AdapterError, match="at least two"):
        check_compatible({"a": _manifest()})
    with pytest.raises(AdapterError, match="'a' and 'b'.*backbone differ"):
        check_compatible({"a": _manifest(), "b": _manifest(backbone="vit_small")})
    other_spec = PatchSpec(pixels=32).to_dict()
    with pytest.raises(AdapterError, match="preprocessing"):
        check_compatible({"a": _manifest(), "b": _manifest(patch_spec=other_spec)})
