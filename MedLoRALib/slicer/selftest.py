"""The module's end-to-end check, shared by ``MedLoRATest`` (inside Slicer) and pytest.

Synthetic CTs (the project's phantom) become volume nodes with labelled markups; one
short epoch of the tiny configuration trains in a background ``medlora train``; the
adapter it writes is registered in a store, attached to a ``medlora serve`` engine and
scores the points into the results table.

Under ``ctest`` (``Slicer --testing``) Slicer has no torch: ``engine_missing`` says so, and
the module's self-test then checks the scene part only (``check_scene``), never failing
with an ImportError.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

from ..adapters.store import AdapterStore
from ..lora_spec import LoraSpec
from ..patches import PatchSpec
from ..synthetic import PhantomConfig, make_phantom
from ..training.augment import AugmentConfig
from ..training.config import TrainConfig
from .mrml import add_markups_node, add_volume_node, link_markups, markups_to_points, set_training_label
from .process import CREATION_FLAGS
from .results import read_table
from .scoring import ScoringSession
from .training import TrainingConfig, start_training
from .training_set import TrainingSetWriter

ENGINE_MODULES = ("torch", "timm", "peft", "safetensors")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a blocked or broken package counts as missing
        return False


def engine_missing(python: str | None = None) -> list[str]:
    """The packages the engine needs that ``python`` (default: this interpreter) lacks."""
    if python is None:
        return [name for name in ENGINE_MODULES if not _importable(name)]
    code = ("import importlib.util, sys; print(','.join(m for m in sys.argv[1:] "
            "if importlib.util.find_spec(m) is None))")
    out = subprocess.run([python, "-c", code, *ENGINE_MODULES], capture_output=True, text=True, timeout=60,
                         creationflags=CREATION_FLAGS)
    return [name for name in out.stdout.strip().split(",") if name] if out.returncode == 0 else list(ENGINE_MODULES)


def check_scene(scene, folder: str | os.PathLike) -> dict:
    """The torch-free part: phantom studies in the scene, their points read back, a training set written."""
    pairs = build_scene(scene)
    points = [p for _, markups in pairs for p in markups_to_points(markups)]
    manifest = TrainingSetWriter.plan(pairs, Path(folder) / "training-set").write_all()
    return {"studies": len(pairs), "points": len(points),
            "labelled": sum(p.training_label is not None for p in points),
            "manifest_rows": len(manifest.read_text(encoding="utf-8").splitlines()) - 1}

def tiny_training(name: str = "selftest", epochs: int = 1, patience: int = 1) -> TrainConfig:
    """A training that finishes in seconds on a CPU: tiny random-init backbone, 32 px axial patches."""
    return TrainConfig(name=name, backbone="medlora_tiny", epochs=epochs, lora=LoraSpec(rank=4), random_init=True,
                       patch_spec=PatchSpec(views="axial", pixels=32), batch_size=8, val_fraction=0.34,
                       patience=patience, augment=AugmentConfig.none())


def build_scene(scene, cases: int = 3) -> list[tuple[object, object]]:
    """Phantom volumes with their nodules as labelled, linked point lists."""
    pairs = []
    config = PhantomConfig(n_nodules=4, malignant_fraction=0.5)
    for case in range(cases):
        image, nodules = make_phantom(config, seed=case, case_id=f"SELFTEST-{case}")
        volume = add_volume_node(scene, image, name=f"selftest-{case}")
        markups = add_markups_node(scene, nodules, name=f"selftest-{case} nodules")
        for index, nodule in enumerate(nodules):
            set_training_label(markups, markups.GetNthControlPointID(index), nodule.label)
        link_markups(volume, markups)
        pairs.append((volume, markups))
    return pairs


def run(scene, folder: str | os.PathLike, logic: ScoringSession | None = None, timeout_s: float = 600.0) -> dict:
    """Train, register, attach, score; returns what was checked.

    The training process and the engine are ended before returning, also on failure.
    ``logic`` (e.g. the module's, whose engine settings find ``MedLoRALib`` in developer
    mode) is used if given; its store must be the one the adapter is registered in.
    """
    folder = Path(folder)
    if logic is None:
        logic = ScoringSession(scene, store=AdapterStore(folder / "store"))
    store = logic.store
    if store is None:
        raise ValueError("the self-test needs a logic with an adapter store")
    pairs = build_scene(scene)
    engine_config = logic.engine.config
    config = TrainingConfig(tiny_training(), python=engine_config.python, env=dict(engine_config.env))
    job = start_training(scene, logic.runner, pairs, folder / "training", config, store=store)
    try:
        state = job.wait(timeout_s)
        if state.exit_code != 0:
            tail = job.handle.stderr_tail() if job.handle is not None else ""
            raise RuntimeError(f"self-test training failed: {state.status}\n{tail}")
        name = logic.attach_adapter(str(store.path(job.stored_adapter)), name=job.stored_adapter)
        volume, markups = pairs[0]
        table, rows = logic.score(volume, markups, adapter=name)
    finally:
        if job.running:
            job.cancel_grace_s = 5.0
            job.cancel()
            job.wait(60.0)
        logic.close()
    return {"points": markups.GetNumberOfControlPoints(), "rows": len(read_table(table)),
            "scored": sum(r.probability is not None for r in rows), "adapter_registered": name in store,
            "random_init_flagged": all(r.random_init for r in rows if r.probability is not None),
            "epochs": len(state.epochs), "epochs_plotted": job.table_node.GetNumberOfRows(),
            "labels": [markups.GetNthControlPointLabel(i) for i in range(markups.GetNumberOfControlPoints())]}
