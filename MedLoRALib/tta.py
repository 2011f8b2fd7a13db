"""Test-time augmentation sets: their names, and which one a ``tta`` setting means for an adapter.

Torch-free (3D Slicer validates manifests and training options with it). A set is a tuple of
(quarter turns, flip columns) in-plane variants of every plane; the engine averages the logits
of its variants (``engine.apply_tta``). Each adapter has a default set, recorded in its manifest
(``AdapterManifest.tta``); ``tta=True`` means that default, ``False`` none, and a count or a set
name overrides it. docs/benchmarks.md ("Fewer test-time augmentation variants") measures what
each set costs in AUC and saves in time.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence

from .errors import MedLoRAError

TTA_TRANSFORMS = tuple(itertools.product((0, 1, 2, 3), (False, True)))  # (quarter turns, flip columns)
TTA_SETS = {
    "d8": TTA_TRANSFORMS,  # every flip and quarter turn
    "rot4": ((0, False), (1, False), (2, False), (3, False)),  # the four quarter turns
    "flip4": ((0, False), (0, True), (2, False), (2, True)),  # identity, column flip, 180°, row flip
    "flip2": ((0, False), (0, True)),  # identity and column flip
    "rot2": ((0, False), (2, False)),  # identity and 180°
    "none": ((0, False),),
}
TTA_BY_COUNT = {8: "d8", 4: "rot4", 2: "flip2", 1: "none"}  # per count, the set that lost least AUC

# An adapter whose manifest names no set (every adapter written before the manifest recorded one)
# scores with all eight variants, exactly as it did then.
UNRECORDED_TTA = "d8"
# The set ``medlora train`` records in new adapters. On the synthetic cohort the four quarter turns
# lost no AUC that matters against all eight, for ortho3 24 mm and for multiview9 50 mm adapters
# (docs/benchmarks.md), at half the images per click.
NEW_ADAPTER_TTA = "rot4"


class TTAError(MedLoRAError):
    """A test-time augmentation setting or set name MedLoRA does not know."""


def _choices() -> str:
    return ", ".join(TTA_SETS)


def _shown(value: object, limit: int = 80) -> str:
    """A value for a message, cut short: it may be anything a client or a file sent."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def check_tta_name(name: object, what: str = "test-time augmentation set") -> str:
    """``name`` if it names a set of ``TTA_SETS``; else a ``TTAError`` that lists them."""
    if isinstance(name, str) and name in TTA_SETS:
        return name
    raise TTAError(f"{what} {_shown(name)} is not one of MedLoRA's sets: {_choices()} "
                   "(d8: all eight flips/quarter turns; rot4: the four quarter turns; none: no augmentation)")


def resolve_tta(tta: bool | int | str, default: str = UNRECORDED_TTA) -> str:
    """The set name a ``tta`` setting means: True → ``default`` (the adapter's own set), False → ``none``,
    a count (8, 4, 2, 1) → the set of that size in ``TTA_BY_COUNT``, a name → itself."""
    if isinstance(tta, bool):
        return check_tta_name(default, "the adapter's test-time augmentation") if tta else "none"
    if isinstance(tta, numbers.Integral) and int(tta) in TTA_BY_COUNT:
        return TTA_BY_COUNT[int(tta)]
    if isinstance(tta, str) and tta in TTA_SETS:
        return tta
    raise TTAError(f"unknown test-time augmentation {_shown(tta)}: use true (the adapter's own set), false, a count "
                   f"({', '.join(map(str, TTA_BY_COUNT))}) or a set ({_choices()})")


def parse_tta_option(text: str) -> str:
    """A command line's ``--tta`` value (a set name or a count) as a set name; ``TTAError`` otherwise."""
    value = text.strip()
    return resolve_tta(int(value) if value.isdigit() else value)


def ensemble_tta(member_sets: Sequence[str]) -> str:
    """An ensemble's TTA set: the members' common set, or each member's joined like their names (``rot4+d8``)."""
    return member_sets[0] if len(set(member_sets)) == 1 else "+".join(member_sets)


def member_tta_sets(ensemble_set: str, members: int) -> list[str]:
    """The set of each of ``members`` members from what ``ensemble_tta`` wrote; ``TTAError`` if it does not fit."""
    parts = str(ensemble_set).split("+")
    if len(parts) == 1:
        parts *= members
    if len(parts) != members:
        raise TTAError(f"test-time augmentation {ensemble_set!r} names {len(parts)} sets for {members} adapters")
    return [check_tta_name(part) for part in parts]
