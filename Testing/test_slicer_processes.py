"""Real child processes driven by the Slicer logic: process-tree cancel, training from the scene."""

from __future__ import annotations

import sys
import time

import psutil
import pytest

from MedLoRALib.slicer import mrml, selftest
from MedLoRALib.slicer.process import SubprocessRunner
from MedLoRALib.slicer.training import TrainingConfig, start_training

pytest.importorskip("slicer")

SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # 2–6 s: the tree is given time to exit on SIGTERM
def test_cancel_ends_the_whole_process_tree():
    handle = SubprocessRunner().start([sys.executable, "-c", SPAWNER])
    [line] = handle.read_lines(timeout=30)
    grandchild = int(line)
    assert psutil.pid_exists(grandchild)
    handle.cancel(grace_s=1)
    assert handle.poll() is not None
    gone = not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert gone


@pytest.fixture(scope="module")
def phantom_scene():
    headless = mrml.create_headless_scene()
    return headless, selftest.build_scene(headless.scene)


def _config(epochs: int, patience: int = 1) -> TrainingConfig:
    return TrainingConfig(selftest.tiny_training("scene-adapter", epochs=epochs, patience=patience))


@pytest.mark.slow
def test_training_from_the_scene_registers_an_adapter_and_plots_each_epoch(phantom_scene, tmp_path):
    from MedLoRALib.adapters.store import AdapterStore

    headless, pairs = phantom_scene
    store = AdapterStore(tmp_path / "store")
    job = start_training(headless.scene, SubprocessRunner(), pairs, tmp_path / "work", _config(2), store=store)
    state = job.wait(timeout_s=400)
    assert state.exit_code == 0, job.handle.stderr_tail()
    assert job.stored_adapter == "scene-adapter" and "scene-adapter" in store
    assert store.info("scene-adapter").backbone == "medlora_tiny"
    assert job.table_node.GetNumberOfRows() == len(state.epochs) >= 1
    assert job.chart_node.GetNumberOfPlotSeriesNodes() == 2
    assert state.fraction == 1.0
    manifest = (tmp_path / "work" / "manifest.csv").read_text().splitlines()
    assert manifest[0].startswith("x,y,z,coordinate_system") and len(manifest) == 1 + 12


@pytest.mark.slow
def test_cancelling_training_ends_every_process_and_keeps_a_resumable_checkpoint(phantom_scene, tmp_path):
    headless, pairs = phantom_scene
    # No early stopping: the run must still be going when it is cancelled.
    job = start_training(headless.scene, SubprocessRunner(), pairs, tmp_path / "work", _config(50, patience=100))
    deadline = time.monotonic() + 300
    while not job.state.epochs:  # let it train one epoch, so there is something to keep
        job.poll()
        assert job.running, job.handle.stderr_tail()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    tree = [job.handle.pid] + [p.pid for p in psutil.Process(job.handle.pid).children(recursive=True)]
    started = time.perf_counter()
    job.cancel_grace_s = 60
    job.cancel()
    assert time.perf_counter() - started < 0.1  # the GUI is not held while the trainer saves its checkpoint
    job.wait(timeout_s=120)
    assert job.state.exit_code == 3, job.state.status
    for pid in tree:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert job.state.checkpoint and str(tmp_path / "work") in job.state.checkpoint
    assert job.state.checkpoint in job.state.status  # the status line says where to resume from
    checkpoints = list((tmp_path / "work").glob("adapter.checkpoint*"))
    assert checkpoints and any(p.iterdir() for p in checkpoints), "no resumable checkpoint left"
    assert not (tmp_path / "work" / "adapter" / "manifest.json").exists(), "a half-written adapter was left"
