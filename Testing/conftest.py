"""Shared fixtures: the real LIDC cases beside the checkout and tiny trained adapters."""

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


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory):
    """Factory ``tiny_adapter(name, spec, **options) -> Path`` of a saved tiny adapter
    (``helpers.save_tiny_adapter``), made once per session for each set of arguments.

    Shared between tests, so treat it as read-only; a test that changes an adapter's files
    saves its own with ``helpers.save_tiny_adapter(tmp_path, ...)``.
    """
    from helpers import save_tiny_adapter

    root = tmp_path_factory.mktemp("tiny-adapters")
    made: dict[str, Path] = {}

    def make(name: str, spec, **options) -> Path:
        key = repr((name, spec, sorted(options.items())))
        if key not in made:
            made[key] = save_tiny_adapter(root / str(len(made)), name, spec, **options)[0]
        return made[key]

    return make


# Three tiny LoRA adapters on one (random-init) backbone and patch spec: head biases that put site-a well
# above and site-b well below 0.5 (they disagree); site-c at threshold 0.3.
ENSEMBLE_MEMBERS = {"site-a": dict(seed=1, head_bias=3.0), "site-b": dict(seed=2, head_bias=-3.0),
                    "site-c": dict(seed=3, head_bias=0.0, manifest={"threshold": 0.3})}


@pytest.fixture(scope="session")
def ensemble_members(tiny_adapter) -> dict[str, Path]:
    """``ENSEMBLE_MEMBERS`` saved (read-only, shared), patch spec ``helpers.ENSEMBLE_SPEC``: name -> path."""
    from helpers import ENSEMBLE_SPEC

    return {name: tiny_adapter(name, ENSEMBLE_SPEC, **options) for name, options in ENSEMBLE_MEMBERS.items()}


@pytest.fixture(scope="module")
def engine_server(tmp_path_factory):
    """An in-process engine (``serve.EngineServer`` on a CPU ``ScoringEngine``) with an empty store of
    its own (``.store``); ``handle`` returns each reply instead of writing it."""
    from MedLoRALib.adapters.store import AdapterStore
    from MedLoRALib.engine import ScoringEngine
    from MedLoRALib.serve import EngineServer

    store = tmp_path_factory.mktemp("store")
    server = EngineServer(ScoringEngine(device="cpu", store=AdapterStore(store)), lambda _: None)
    server.store = store
    return server


@pytest.fixture(scope="session")
def tcia_download(tmp_path_factory, shared_data: Path):
    """A tiny LIDC-IDRI download in TCIA's layout (``helpers.write_tcia_download``), made once per session:
    (root, xml_root, truth). Shared: a test that changes it must restore it."""
    from helpers import write_tcia_download

    return write_tcia_download(tmp_path_factory.mktemp("tcia"), shared_data)
