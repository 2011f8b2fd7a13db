"""Shared fixtures: the real LIDC cases beside the checkout and a small synthetic CT."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDLORA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (read-only). Its absence is a broken checkout, not a skip."""
    if not (SHARED_DATA / "lidc").is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}; set MEDLORA_SHARED_DATA")
    return SHARED_DATA


def _series_dir(case: Path) -> Path:
    return next(p.parent for p in sorted(case.rglob("*.dcm")))


@pytest.fixture(scope="session")
def lidc_0001(shared_data: Path) -> Path:
    """Folder holding the DICOM series (and the XML reads) of LIDC-IDRI-0001."""
    return _series_dir(shared_data / "lidc" / "LIDC-IDRI-0001")


@pytest.fixture(scope="session")
def lidc_0003(shared_data: Path) -> Path:
    return _series_dir(shared_data / "lidc" / "LIDC-IDRI-0003")
