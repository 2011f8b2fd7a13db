"""The module's logic on a real MRML scene (slicer-core): what the buttons act on, jobs, scene close.

Each test here fails on the code before issue 15: the label/crop buttons read the active
control point, the chooser's cancel scored the first candidate, starting a training wrote
every volume before returning, closing the scene left processes and observers behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")

from MedLoRALib.errors import MedLoRAError  # noqa: E402
from MedLoRALib.geometry import Geometry, lps_to_ras  # noqa: E402
from MedLoRALib.image import CTImage  # noqa: E402
from MedLoRALib.patches import PatchSpec  # noqa: E402
from MedLoRALib.slicer import mrml, results, selftest  # noqa: E402
from MedLoRALib.slicer.batch import BatchScoring, find_studies  # noqa: E402
from MedLoRALib.slicer.module_logic import ModuleLogic  # noqa: E402
from MedLoRALib.slicer.process import describe_exit  # noqa: E402
from MedLoRALib.slicer.scoring import ScoringSession, cut_patches, rows_from_results  # noqa: E402
from MedLoRALib.slicer.training import TrainingConfig, plot_view_node  # noqa: E402
from MedLoRALib.training.config import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "MedLoRA"


def _module():
    sys.path.insert(0, str(MODULE_DIR))
    try:
        import MedLoRA
    finally:
        sys.path.remove(str(MODULE_DIR))
    return MedLoRA


def _our_children(words=("serve", "train")) -> list:
    import psutil

    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and set(words) & set(proc.cmdline()):
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


@pytest.fixture()
def headless():
    return mrml.create_headless_scene()


@pytest.fixture()
def pairs(headless):
    return selftest.build_scene(headless.scene, cases=2)


def test_parameter_node_annotates_concrete_node_classes_and_allows_none():
    """Slicer's wrapper instantiates every annotated node class (getNodeTypes, v5.4.0); None must be listed."""
    import slicer

    hints = typing.get_type_hints(_module().MedLoRAParameterNode, include_extras=True)
    node_fields = {}
    for name, hint in hints.items():
        args = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        classes = [a for a in args if isinstance(a, type) and issubclass(a, slicer.vtkMRMLNode)]
        if classes:
            node_fields[name] = (classes, type(None) in args)
    assert set(node_fields) == {"inputVolume", "inputMarkups", "resultsTable"}
    for name, (classes, optional) in node_fields.items():
        assert optional, f"{name} must allow None (Optional[...]): the widget starts with nothing selected"
        for cls in classes:
            assert cls().GetClassName() == cls.__name__  # abstract classes raise here
    assert {c.__name__ for c in node_fields["inputMarkups"][0]} == {"vtkMRMLMarkupsFiducialNode",
                                                                  "vtkMRMLMarkupsROINode"}


def test_logic_holds_a_module_logic_instead_of_inheriting_it(headless):
    MedLoRA = _module()
    assert not issubclass(MedLoRA.MedLoRALogic, ModuleLogic)
    logic = MedLoRA.MedLoRALogic(scene=headless.scene)
    assert isinstance(logic.moduleLogic, ModuleLogic) and logic.moduleLogic.scene is headless.scene
    assert logic.moduleLogic.session.runner.__class__.__name__ == "SubprocessRunner"  # no Qt here
    logic.close()


def test_label_button_labels_the_point_of_the_selected_results_row(headless, pairs):
    (volume, markups), (other_volume, other_markups) = pairs
    logic = ModuleLogic(headless.scene, workDir=None)
    rows = [results.ScoreRow(volume=volume.GetName(), nodule=p.name, point_id=p.point_id, r=p.position_ras[0],
                             a=p.position_ras[1], s=p.position_ras[2], probability=0.5)
            for p in mrml.markups_to_points(markups)]
    table = results.write_table(headless.scene, rows)
    markups.GetDisplayNode().SetActiveControlPoint(-1)  # what Slicer has once a module button is clicked
    mrml.set_training_label(markups, markups.GetNthControlPointID(0), None)
    point = logic.selectedPoint(volume, markups, table, row=2)
    assert point.point_id == markups.GetNthControlPointID(2)
    message = logic.labelPoint(markups, point, 0)
    assert mrml.training_labels_attribute(markups)[markups.GetNthControlPointID(2)] == 0
    assert message.endswith("labelled benign")
    # an explicit point number, when no row is selected
    assert logic.selectedPoint(volume, markups, table, row=-1, pointIndex=3).index == 3
    # a row of another point list is refused, never mapped to a wrong point
    with pytest.raises(MedLoRAError, match="not a point of"):
        logic.selectedPoint(other_volume, other_markups, table, row=0)
    with pytest.raises(MedLoRAError, match="select the nodule"):
        logic.selectedPoint(volume, markups)
    logic.close()


def test_cancelling_the_markups_chooser_scores_nothing(headless):
    """Two unlinked point lists: the chooser is asked; cancel (None) skips the volume, nothing is scored."""
    from MedLoRALib.synthetic import PhantomConfig, make_phantom

    image, nodules = make_phantom(PhantomConfig(n_nodules=2), seed=1, case_id="unlinked")
    volume = mrml.add_volume_node(headless.scene, image, name="unlinked")
    first = mrml.add_markups_node(headless.scene, nodules, name="first list")
    mrml.add_markups_node(headless.scene, nodules, name="second list")
    session = ScoringSession(headless.scene)
    asked = []

    def cancel(volume_node, candidates):
        asked.append((volume_node.GetName(), [c.GetName() for c in candidates]))
        return None

    job = BatchScoring(session, find_studies(headless.scene, cancel))
    assert asked == [("unlinked", ["first list", "second list"])]
    while not job.poll():
        pass
    assert [r.error for r in job.rows] == ["skipped: no point list chosen for this volume"]
    assert session.engine.starts == 0  # no engine, no request: nothing was scored
    assert "·" not in first.GetNthControlPointLabel(0)  # no point was labelled with a score
    with pytest.raises(MedLoRAError, match="not one of the candidates"):
        find_studies(headless.scene, lambda v, c: volume)


def test_points_without_a_position_get_a_warning_row(headless):
    from MedLoRALib.synthetic import PhantomConfig, make_phantom

    image, nodules = make_phantom(PhantomConfig(n_nodules=3), seed=2, case_id="partial")
    volume = mrml.add_volume_node(headless.scene, image, name="partial")
    markups = mrml.add_markups_node(headless.scene, nodules, name="partial points")
    markups.UnsetNthControlPointPosition(1)  # undefined: e.g. placement not finished
    markups.SetNthControlPointPositionMissing(2)  # missing: skipped by the user
    batch = cut_patches(volume, markups, PatchSpec(views="axial", fov_mm=30.0, pixels=16))
    assert len(batch.points) == 1 and len(batch.patches) == 1
    rows = rows_from_results(batch, [{"probability": 0.25, "label": "benign"}], "a", "v1")
    assert len(rows) == 3 and rows[0].probability == 0.25
    assert "is not placed yet" in rows[1].error and "is marked missing" in rows[2].error
    assert all(np.isnan(r.r) and r.probability is None for r in rows[1:])
    table = results.write_table(headless.scene, rows)
    assert table.GetNumberOfRows() == 3
    assert results.result_position_ras(table, 1) is None


def test_results_table_is_written_where_column_titles_cannot_be_headers(headless):
    """Slicer 5.4 and 5.6.0 have no vtkMRMLTableNode.SetUseColumnTitleAsColumnHeader (added in 5.6.1)."""

    class Slicer54Table:
        def __init__(self, node):
            self._node = node

        def __getattr__(self, name):
            if name == "SetUseColumnTitleAsColumnHeader":
                raise AttributeError(name)
            return getattr(self._node, name)

    node = headless.scene.AddNewNodeByClass("vtkMRMLTableNode", "old")
    rows = [results.ScoreRow(volume="v", nodule="n", point_id="p", r=1.0, a=2.0, s=3.0, probability=0.9)]
    results.write_table(headless.scene, rows, Slicer54Table(node))
    assert results.read_table(node)[0].probability == pytest.approx(0.9)


def test_training_plot_goes_to_a_plot_view_node(headless):
    chart = headless.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "chart")
    view = plot_view_node(headless.scene, chart)
    assert view.IsA("vtkMRMLPlotViewNode") and view.GetPlotChartNodeID() == chart.GetID()
    other = headless.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "chart 2")
    assert plot_view_node(headless.scene, other, view) is view and view.GetPlotChartNodeID() == other.GetID()
    source = (MODULE_DIR / "MedLoRA.py").read_text()
    assert "setMRMLPlotViewNode(" in source and "setMRMLPlotChartNode" not in source


def _big_ct(slices: int) -> CTImage:
    voxels = np.full((slices, 512, 512), -800, np.int16)
    voxels[:, 200:300, 200:300] = 40
    geometry = Geometry(size=(512, 512, slices), spacing=(0.7, 0.7, 0.8), origin_lps=(-180.0, -180.0, -200.0))
    return CTImage(voxels_hu=voxels, geometry=geometry)


@pytest.mark.slow  # a 500-slice CT (260 MB) is built and partly written: about 5 s
def test_starting_a_training_on_a_500_slice_volume_returns_within_100_ms(headless, tmp_path):
    image = _big_ct(500)
    volume = mrml.add_volume_node(headless.scene, image, name="big")
    centres = [image.geometry.ijk_to_lps(np.array([250.0, 250.0, k])) for k in (100.0, 300.0)]
    markups = headless.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "big points")
    for index, centre in enumerate(centres):
        markups.AddControlPointWorld(*lps_to_ras(centre), f"p{index}")
        mrml.set_training_label(markups, markups.GetNthControlPointID(index), index)
    mrml.link_markups(volume, markups)
    logic = ModuleLogic(headless.scene, workDir=str(tmp_path))
    started = time.perf_counter()
    job = logic.startTraining(TrainingConfig(TrainConfig(name="big", epochs=1)), volume, markups)
    elapsed = time.perf_counter() - started
    print(f"startTraining on 512x512x500 int16: returned in {1000 * elapsed:.1f} ms")
    assert elapsed < 0.1
    ticks = []
    while job.writer.written_bytes < job.writer.total_bytes // 2:  # each tick writes a bounded slab
        started = time.perf_counter()
        logic.tick()
        ticks.append(time.perf_counter() - started)
    print(f"ticks while writing: {len(ticks)}, longest {1000 * max(ticks):.1f} ms, "
          f"median {1000 * float(np.median(ticks)):.1f} ms")
    assert max(ticks) < 0.1 and "writing the training set" in job.status
    assert 0 < job.progress < 0.05
    partial = job.writer.images[0].tmp
    assert partial.exists() and not job.writer.images[0].path.exists()
    logic.cancelJob()  # while writing: the partial file goes, no process was started
    assert not partial.exists() and job.handle is None
    while logic.busy():
        logic.tick()
    assert job.finished and "cancelled" in job.status and not (tmp_path / "big" / "manifest.csv").exists()
    logic.close()


def test_training_set_written_in_slices_reads_back_as_the_volume(headless, pairs, tmp_path):
    from MedLoRALib.ctio import load_volume_file
    from MedLoRALib.slicer.training_set import TrainingSetWriter

    volume = pairs[0][0]
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    image = mrml.volume_to_ct_image(volume)
    oblique = CTImage(voxels_hu=image.voxels_hu, geometry=Geometry(size=image.geometry.size,
                                                                   spacing=image.geometry.spacing,
                                                                   origin_lps=image.geometry.origin_lps,
                                                                   direction=rotation))
    volume = mrml.add_volume_node(headless.scene, oblique, name="oblique")
    writer = TrainingSetWriter.plan([(volume, pairs[0][1])], tmp_path)
    steps = 0
    while not writer.step(budget_bytes=50_000):
        steps += 1
    assert steps > 5  # really written in several pieces
    back = load_volume_file(writer.images[0].path)
    assert np.array_equal(back.voxels_hu, oblique.voxels_hu)
    assert np.allclose(back.geometry.ras_from_ijk, oblique.geometry.ras_from_ijk)
    assert writer.manifest.read_text().count("\n") == 1 + 4


@pytest.mark.slow  # starts a real engine process (a few seconds)
def test_closing_the_scene_cancels_the_job_lets_the_engine_go_and_leaves_no_process(headless, pairs, tmp_path):
    logic = ModuleLogic(headless.scene, workDir=str(tmp_path))
    logic.session.engine.config.python = sys.executable
    logic.session.engine.launch()  # a warm engine, as after a first score
    engine_pid = logic.session.engine.pid
    job = logic.startTraining(TrainingConfig(TrainConfig(name="closing", epochs=1)), *pairs[0])
    logic.tick()
    assert engine_pid and not job.finished
    started = time.perf_counter()
    headless.scene.Clear(0)  # StartCloseEvent
    assert time.perf_counter() - started < 0.5
    assert logic.job is None and not logic.session.engine.is_running()
    deadline = time.monotonic() + 30
    while logic.busy():
        logic.tick()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert job.finished and _our_children() == []
    assert logic.observerCount() == 1  # only the scene's close observer, which the next scene needs
    logic.close()
    assert logic.observerCount() == 0 and not headless.scene.HasObserver("StartCloseEvent")


def test_exit_codes_are_described_whoever_reports_them():
    assert describe_exit(-9).startswith("killed by SIGKILL") and "memory" in describe_exit(-9)
    assert "SIGKILL" in describe_exit(137) and "launcher" in describe_exit(137)  # PythonSlicer, a shell
    assert "access violation" in describe_exit(0xC0000005)  # Windows crash through QProcess / the launcher
    assert describe_exit(3) == "exit code 3" and describe_exit(None) == "still running"


def test_pip_constraints_pin_slicers_own_packages_as_installed(tmp_path):
    import importlib.metadata

    from packaging.requirements import Requirement

    from MedLoRALib.slicer import dependencies

    lines = dependencies.write_constraints(tmp_path / "c.txt").read_text().split()
    pins = {Requirement(line).name: Requirement(line) for line in lines}
    for name in ("numpy", "SimpleITK", "torch"):
        assert str(pins[name].specifier) == f"=={importlib.metadata.version(name)}"
    assert set(pins) <= set(dependencies.NEVER_PIP)
    assert dependencies._slicer_pip_ensure() is None  # slicer.packaging is Slicer >= 5.12 only


def test_self_test_without_torch_says_so_and_checks_the_scene_part():
    """ctest runs the module's self-test in a Slicer without torch: no ImportError, a clear skip."""
    code = f"""
import importlib.abc, sys
class NoEngine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'timm', 'peft', 'safetensors'):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoEngine())
sys.path.insert(0, {str(MODULE_DIR)!r})
from MedLoRALib.slicer import mrml
mrml.create_headless_scene()
import MedLoRA
MedLoRA.MedLoRATest('runTest').runTest()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "engine part SKIPPED: torch, timm, peft, safetensors not installed" in out.stdout
