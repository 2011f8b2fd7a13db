"""The Slicer logic scoring through a real ``medlora serve`` child process (slicer-core, no Qt).

One engine is shared by the module's tests (starting it costs seconds); a finalizer shuts
it down, and the last test checks that no engine or trainer process of this run is left.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from MedLoRALib.adapters.store import AdapterStore
from MedLoRALib.engine import ScoringEngine
from MedLoRALib.patches import PatchSpec
from MedLoRALib.slicer import mrml, results, selftest
from MedLoRALib.slicer.engine_client import EngineConfig, EngineError
from MedLoRALib.slicer.scoring import ScoringSession, cut_patches

pytest.importorskip("slicer")
pytestmark = pytest.mark.slow  # every test here needs the engine, whose start takes ~10 s on 2 busy cores
torch.set_num_threads(1)

# Small requests (four 32-px axial patches, about 22 kB of base64) fit in a pipe's buffer,
# so a request can be sent to a stopped engine.
SPEC = PatchSpec(views="axial", fov_mm=40.0, pixels=32)
MODULE_DIR = Path(__file__).resolve().parents[1] / "MedLoRA"


def _our_engines() -> list[psutil.Process]:
    """Engine or trainer processes started by this test process that are still alive."""
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and {"serve", "train"} & set(proc.cmdline()):
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


@pytest.fixture(scope="module")
def adapter_paths(tiny_adapter) -> dict[str, Path]:
    """Two real adapters for the same tiny backbone: different LoRA weights and heads; site-b records its own
    test-time augmentation set (rot4), site-a none (d8, as adapters made before the manifest recorded one)."""
    return {name: tiny_adapter(name, SPEC, seed=seed, head_bias=bias, manifest=manifest)
            for seed, (name, bias, manifest) in enumerate((("site-a", 1.5, {}), ("site-b", -1.5, {"tta": "rot4"})))}


@pytest.fixture(scope="module")
def expected(adapter_paths):
    """Scores of the same patches from the engine in this process, per adapter."""
    engine = ScoringEngine(device="cpu")
    for name, path in adapter_paths.items():
        engine.attach_adapter(path, name=name)

    def score(patches: np.ndarray, adapter: str) -> np.ndarray:
        return np.array([r["probability"] for r in engine.score_patches(patches, adapter=adapter)])

    return score


@pytest.fixture(scope="module")
def scene():
    headless = mrml.create_headless_scene()
    pairs = selftest.build_scene(headless.scene, cases=2)
    for _volume, markups in pairs:
        markups.AddControlPointWorld(900.0, 900.0, 900.0, "far")  # outside every volume
    return headless, pairs


@pytest.fixture(scope="module")
def logic(scene, adapter_paths):
    headless, _ = scene
    config = EngineConfig(python=sys.executable, extra_args=["--device", "cpu"],
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    scene_logic = ScoringSession(headless.scene, engine_config=config)
    yield scene_logic
    scene_logic.close()
    assert not scene_logic.engine.is_running()


@pytest.fixture(scope="module")
def attached(logic, adapter_paths) -> ScoringSession:
    for name, path in adapter_paths.items():
        assert logic.attach_adapter(str(path), name=name) == name
    return logic


def test_scoring_through_the_engine_fills_one_row_per_control_point(scene, attached, expected):
    headless, pairs = scene
    volume, markups = pairs[0]
    table, rows = attached.score(volume, markups, adapter="site-a")

    assert table.GetNumberOfRows() == markups.GetNumberOfControlPoints() == 5
    titles = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert titles == [title for title, _, _ in results.COLUMNS]
    assert results.read_table(table) == rows
    ids = [markups.GetNthControlPointID(i) for i in range(5)]
    assert [r.point_id for r in rows] == ids
    scored, far = rows[:4], rows[4]
    batch = cut_patches(volume, markups, SPEC)
    np.testing.assert_allclose([r.probability for r in scored], expected(batch.patches, "site-a"), rtol=1e-5)
    for row in scored:
        assert row.adapter == "site-a" and row.random_init and not row.error and row.tta == "d8"
        assert row.label == int(row.probability >= 0.5)
        assert row.label_name == ("malignant" if row.label else "benign")
        assert len(row.adapter_version) == 12
    assert far.probability is None and "outside volume" in far.error
    # The points show their score and the adapter; the far one says it was not scored.
    labels = [markups.GetNthControlPointLabel(i) for i in range(5)]
    assert labels[0] == f"SELFTEST-0/n1 · {round(100 * rows[0].probability)}% site-a (random-init)"
    assert labels[4] == "far · not scored"
    assert [bool(markups.GetNthControlPointSelected(i)) for i in range(5)] == [r.label == 1 for r in rows]
    # Table names stay the user's names when scoring again.
    _, again = attached.score(volume, markups, adapter="site-a", table_node=table)
    assert [r.nodule for r in again] == [r.nodule for r in rows]
    assert table.GetNumberOfRows() == 5


def test_switching_adapters_in_one_engine_gives_each_adapters_own_scores(scene, attached, expected):
    headless, pairs = scene
    volume, markups = pairs[1]
    patches = cut_patches(volume, markups, SPEC).patches
    pid, starts = attached.engine.pid, attached.engine.starts
    probabilities = {}
    for name in ("site-a", "site-b", "site-a"):
        attached.set_adapter(name)
        _, rows = attached.score(volume, markups)  # the active adapter
        assert {r.adapter for r in rows if not r.error} == {name}
        assert {r.tta for r in rows if not r.error} == {"rot4" if name == "site-b" else "d8"}  # its own set
        got = np.array([r.probability for r in rows if not r.error])
        np.testing.assert_allclose(got, expected(patches, name), rtol=1e-5)
        if name in probabilities:
            np.testing.assert_array_equal(got, probabilities[name])  # deterministic, nothing reloaded
        probabilities[name] = got
    assert np.all(probabilities["site-a"] > 0.6) and np.all(probabilities["site-b"] < 0.4)
    assert (attached.engine.pid, attached.engine.starts) == (pid, starts)  # one engine all along
    assert attached.engine.status()["adapters"] == ["site-a", "site-b"]


def test_engine_killed_mid_request_gives_a_clear_error_and_the_next_request_restarts_it(scene, attached):
    headless, pairs = scene
    volume, markups = pairs[0]
    attached.set_adapter("site-b")
    _, before = attached.score(volume, markups)
    pid, starts = attached.engine.pid, attached.engine.starts

    os.kill(pid, signal.SIGSTOP)  # the request below is sent but can never be answered
    job = attached.begin_score(volume, markups)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(EngineError) as failure:
        job.wait(timeout_s=30)
    message = str(failure.value)
    assert "stopped while answering 'score'" in message and "SIGKILL" in message
    assert "randomly initialised" in message  # the engine's own stderr tail comes along
    assert "restarted on the next request" in message
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    _, after = attached.score(volume, markups)  # restarts the engine and re-attaches both adapters
    assert attached.engine.starts == starts + 1 and attached.engine.pid != pid
    assert [r.probability for r in after] == [r.probability for r in before]
    assert {r.adapter for r in after if not r.error} == {"site-b"}  # the active adapter survived
    assert attached.engine.status()["adapters"] == ["site-a", "site-b"]

    # Dying between requests: the next request just works, and the reason is kept for the GUI.
    os.kill(attached.engine.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while attached.engine.is_running():  # (waiting through psutil would reap it and hide the signal)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.perf_counter()
    job = attached.begin_score(volume, markups, adapter="site-a")
    assert time.perf_counter() - started < 2.0  # the restart is launched, not waited for
    assert job.stage == "engine" and job.poll() is False
    again = job.wait(timeout_s=120)
    assert job.stage == "done" and attached.engine.starts == starts + 2
    assert "SIGKILL" in attached.engine.restart_reason
    attached.engine.restart_reason = None  # read (the module's status line shows it once)
    assert {r.adapter for r in again if not r.error} == {"site-a"}


def test_module_logic_scores_all_loaded_studies_and_cancels_between_them(scene, attached, adapter_paths, tmp_path):
    sys.path.insert(0, str(MODULE_DIR))
    try:
        import MedLoRA
    finally:
        sys.path.remove(str(MODULE_DIR))
    headless, pairs = scene
    store = AdapterStore(tmp_path / "store")
    for path in adapter_paths.values():
        store.import_(path)
    bare = mrml.add_volume_node(headless.scene, mrml.volume_to_ct_image(pairs[0][0]), name="no points")
    module_logic = MedLoRA.MedLoRALogic(scene=headless.scene, engine=attached.engine, store=store).moduleLogic
    try:
        job = module_logic.beginScoreAll("site-b", device="cpu")
        assert [s.volume.GetName() for s in job.studies] == ["selftest-0", "selftest-1", "no points"]
        while module_logic.tick() is not job:
            time.sleep(0.02)
        assert module_logic.jobStatus(job) == "3/3 studies scored"
        assert [r.volume for r in job.rows] == ["selftest-0"] * 5 + ["selftest-1"] * 5 + ["no points"]
        assert "no markups linked" in job.rows[-1].error
        assert sum(r.probability is not None for r in job.rows) == 8
        assert job.table_node.GetNumberOfRows() == 11
        first = job.rows[0]
        assert results.result_position_ras(job.table_node, 0) == pytest.approx((first.r, first.a, first.s))
        assert results.result_position_ras(job.table_node, 10) is None  # no point to centre on

        job = module_logic.beginScoreAll("site-a", device="cpu")
        module_logic.tick()  # the first study's request is in flight
        module_logic.cancelJob()
        assert module_logic.job is None and module_logic.ending == [job]  # winding down in the background
        while module_logic.busy():
            module_logic.tick()
            time.sleep(0.02)
        assert job.done == 1 and [r.volume for r in job.rows] == ["selftest-0"] * 5
        assert module_logic.jobStatus(job) == "1/3 studies scored (cancelled)"
        assert job.table_node.GetNumberOfRows() == 5

        # Cancelling one scoring request ends the engine (no error); the next request restarts it.
        starts = attached.engine.starts
        volume, markups = pairs[1]
        job = module_logic.beginScore(volume, markups, "site-a", device="cpu")
        assert job.stage == "score" and module_logic.jobStatus(job) == "scoring…"
        module_logic.cancelJob()
        assert job.finished and module_logic.jobStatus(job) == "scoring cancelled"
        assert job.results_table is None and not attached.engine.is_running()
        job = module_logic.beginScore(volume, markups, "site-a", device="cpu")
        assert module_logic.jobStatus(job) == "starting the scoring engine…"
        while module_logic.tick() is not job:
            time.sleep(0.05)
        assert attached.engine.starts == starts + 1 and len(job.rows) == 5
        assert mrml.markups_for_volume(volume) is markups  # the scored pair is remembered for batch/training
    finally:
        headless.scene.RemoveNode(bare)


def _colour_mask(pixels: np.ndarray, rgb: tuple[float, float, float], tolerance: int = 40) -> np.ndarray:
    return np.all(np.abs(pixels[..., :3].astype(float) - np.array(rgb) * 255) < tolerance, axis=-1)


def test_real_lidc_nodule_scored_by_the_engine_is_drawn_in_its_score_colour(scene, attached, lidc_0001, tmp_path):
    from MedLoRALib.annotations import load_nodules
    from MedLoRALib.ctio import load_ct
    from MedLoRALib.geometry import lps_to_ras
    from MedLoRALib.slicer import render

    headless, _ = scene
    if importlib.util.find_spec("triton") is not None:  # before Mesa's libLLVM: see test_slicer_render.py
        importlib.import_module("triton")
    image = load_ct(lidc_0001)
    [nodule] = load_nodules(next(lidc_0001.glob("*.xml")), image=image)
    volume = mrml.add_volume_node(headless.scene, image, name="LIDC-IDRI-0001")
    markups = mrml.add_markups_node(headless.scene, [nodule], name="consensus")
    nodule_ras = lps_to_ras(nodule.centre_lps)
    try:
        with render.virtual_display():
            for adapter, colour, other in (("site-a", results.MALIGNANT_RGB, results.BENIGN_RGB),
                                           ("site-b", results.BENIGN_RGB, results.MALIGNANT_RGB)):
                _, [row] = attached.score(volume, markups, adapter=adapter)
                assert row.label == (colour == results.MALIGNANT_RGB)  # site-a scores high, site-b low
                view = render.render_slice_view(volume, markups, tmp_path / f"{adapter}.png",
                                                app_logic=headless.app_logic, centre_ras=nodule_ras + [40, 0, 0],
                                                size=(300, 300), field_of_view_mm=200.0)
                pixels = render.read_png(view.path)
                column, line = view.pixel_of(nodule_ras)
                # The view is centred 40 mm to the patient's right of the nodule; Slicer draws the
                # patient's right on the screen's left, so the nodule lies 60 px right of the middle.
                assert abs(column - 210) < 2 and abs(line - 149.5) < 2
                assert view.points_px == {f"{nodule.nodule_id} · {round(100 * row.probability)}% {adapter} "
                                          f"(random-init)": pytest.approx((column, line))}
                near = (slice(int(line) - 8, int(line) + 9), slice(int(column) - 8, int(column) + 9))
                glyph = _colour_mask(pixels, colour)[near]
                assert glyph.sum() >= 10, f"{adapter}: no glyph in the score colour at the nodule"
                assert _colour_mask(pixels, other)[near].sum() == 0
                rows_px, cols_px = np.nonzero(glyph)
                assert abs(cols_px.mean() - 8) < 3 and abs(rows_px.mean() - 8) < 3
    finally:
        headless.scene.RemoveNode(markups)
        headless.scene.RemoveNode(volume)


def test_module_self_test_trains_in_the_background_registers_attaches_and_scores(tmp_path):
    """``MedLoRATest`` as Slicer runs it, on a headless scene: the module's own logic and engine settings."""
    import unittest

    headless = mrml.create_headless_scene()  # also slicer.mrmlScene, which the self-test uses
    sys.path.insert(0, str(MODULE_DIR))
    try:
        import MedLoRA
    finally:
        sys.path.remove(str(MODULE_DIR))
    outcome = unittest.TestResult()
    MedLoRA.MedLoRATest("runTest").run(outcome)
    assert outcome.wasSuccessful(), outcome.errors + outcome.failures
    assert outcome.testsRun == 1
    tables = [n.GetName() for n in headless.scene.GetNodesByClass("vtkMRMLTableNode")]
    assert "MedLoRA results" in tables and "selftest training" in tables


def test_no_engine_or_trainer_process_is_left(logic):
    logic.close()
    deadline = time.monotonic() + 10
    while _our_engines() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _our_engines() == []
