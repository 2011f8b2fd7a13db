"""Export SR from the Slicer logic (slicer-core, no Qt): LIDC-IDRI-0001 loaded as Slicer's DICOM module
loads it, scored through a real ``medlora serve`` with the tiny adapter (and with an ensemble of two),
written by the SR child process. One scored scene serves every test; where the child would only repeat
what the first test shows, the request it would read is written in-process (``_write_in_process``).

The volume is built the way ``DICOMScalarVolumePlugin`` builds it (``Modules/Scripted/DICOMPlugins/
DICOMScalarVolumePlugin.py`` v5.4.0 to v5.12.3): no MedLoRA attributes, the SOP Instance UIDs in
``DICOM.instanceUIDs``, the series under its study and patient in the subject hierarchy
(``DICOMLib/DICOMPlugin.py`` ``addSeriesInSubjectHierarchy``). Slicer's DICOM database (CTK) is not in
slicer-core; ``FolderDicomIndex`` answers its ``fileForInstance`` from the series' folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import ENSEMBLE_SPEC, ensemble_probabilities, sr_text, tree_digest

from MedLoRALib.annotations import load_nodules
from MedLoRALib.ctio import list_series, load_ct
from MedLoRALib.errors import MedLoRAError
from MedLoRALib.image import CTImage
from MedLoRALib.nodule import Nodule
from MedLoRALib.report.request import write_from_request
from MedLoRALib.report.sr import DISAGREE_CONCEPT, LABEL_CONCEPT, SRError, manifest_sha256
from MedLoRALib.slicer import mrml, sr_export
from MedLoRALib.slicer.results import ScoreRow, read_table, write_table

pytest.importorskip("slicer")
hd = pytest.importorskip("highdicom")
pytestmark = pytest.mark.slow  # the engine's start (~10 s) and the SR child (~3 s) on 2 busy cores

MODULE_DIR = Path(__file__).resolve().parents[1] / "MedLoRA"
SPEC = ENSEMBLE_SPEC  # one 32 px image per nodule: fast
PROBABILITY = pydicom.sr.codedict.codes.DCM.ProbabilityOfCancer


def add_as_dicom_module_does(scene, folder: Path, name: str = "1: LIDC CT"):
    """A volume node as Slicer's DICOM scalar volume plugin leaves it, and the CT it was read from."""
    import slicer

    ct = load_ct(folder)
    node = mrml.add_volume_node(scene, CTImage(voxels_hu=ct.voxels_hu, geometry=ct.geometry), name=name)
    (series,) = [s for s in list_series(folder) if s.uid == ct.ids.series_uid]
    uids = [str(pydicom.dcmread(s.path, stop_before_pixels=True).SOPInstanceUID) for s in series.slices]
    node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    hierarchy.SetItemUID(item, "DICOM", ct.ids.series_uid)
    slicer.vtkSlicerSubjectHierarchyModuleLogic.InsertDicomSeriesInHierarchy(
        hierarchy, ct.ids.patient_id, ct.ids.study_uid, ct.ids.series_uid)
    return node, ct


@pytest.fixture(scope="module")
def case(lidc_0001, tiny_adapter, tmp_path_factory):
    """The module's logic on a scene with LIDC-IDRI-0001, its XML nodule, one more point and one outside."""
    sys.path.insert(0, str(MODULE_DIR))
    try:
        import MedLoRA
    finally:
        sys.path.remove(str(MODULE_DIR))
    from MedLoRALib.adapters.store import AdapterStore

    folder = tmp_path_factory.mktemp("slicer-sr")
    headless = mrml.create_headless_scene()
    logic = MedLoRA.MedLoRALogic(scene=headless.scene, store=AdapterStore(folder / "store"),
                                 workDir=str(folder / "work")).moduleLogic
    logic.session.engine.config.extra_args = ["--device", "cpu"]  # what beginScore(device="cpu") asks for
    logic.session.engine.launch()  # its start (torch's import) overlaps making the adapter and loading the CT
    try:
        logic.importAdapter(tiny_adapter("tiny-sr", SPEC, manifest={"threshold": 0.5}))
        volume, ct = add_as_dicom_module_does(headless.scene, lidc_0001)
        (xml_nodule,) = load_nodules(next(lidc_0001.glob("*.xml")), image=ct)
        extra = Nodule(centre_lps=tuple(np.array(xml_nodule.centre_lps) + (25.0, 0.0, 0.0)),
                       nodule_id="extra-point")
        markups = mrml.add_markups_node(headless.scene, [xml_nodule, extra], name="LIDC points")
        markups.AddControlPointWorld(900.0, 900.0, 900.0, "far")
        job = _finish(logic, logic.beginScore(volume, markups, "tiny-sr", tta=False, device="cpu"), timeout_s=300)
        assert logic.session.engine.starts == 1  # the engine launched above did the scoring
        database = sr_export.FolderDicomIndex(lidc_0001)
        yield {"scene": headless.scene, "volume": volume, "markups": markups, "table": job.results_table,
               "ct": ct, "nodules": [xml_nodule, extra], "logic": logic, "database": database, "folder": folder}
    finally:
        logic.close()


def _finish(logic, job, timeout_s: float = 120.0):
    """Tick the logic as the widget's timer does until the job is done (errors are raised)."""
    deadline = time.monotonic() + timeout_s
    while logic.tick() is None:
        assert time.monotonic() < deadline, job.status
        time.sleep(0.05)
    return job


def _export(case, out: Path, volume=None, table=None, **options):
    logic = case["logic"]
    job = logic.beginExportSR(volume or case["volume"], table or case["table"], out, dicomDatabase=case["database"],
                              **options)
    assert logic.job is job and not job.finished  # the child writes; the GUI's timer polls
    return _finish(logic, job)


def _write_in_process(case, out: Path, table=None) -> Path:
    """What the child of an export writes, written here (the request through JSON as the child reads it):
    every check of ``beginExportSR`` without the child's ~5 s start. The child's own route is tested by
    the first test, the ensemble's and the cancel test."""
    request, _ = sr_export.export_request(case["logic"].session, case["volume"], table or case["table"], out,
                                          database=case["database"])
    return write_from_request(json.loads(json.dumps(request)))


def _probabilities(table) -> list[float]:
    column = table.GetTable().GetColumnByName("Probability")
    return [column.GetValue(i) for i in range(table.GetNumberOfRows())]


def test_export_sr_reads_back_to_the_scored_points_and_probabilities(case, lidc_0001, tmp_path):
    out = tmp_path / "lidc-sr.dcm"
    job = _export(case, out)
    assert job.written == out and "2 nodules" in job.status and "'far'" in job.status
    assert not job.request_file.exists()

    sr = hd.sr.srread(out)
    groups = sr.content.get_planar_roi_measurement_groups()
    points = mrml.markups_to_points(case["markups"])[:2]  # 'far' lies outside the volume: not scored
    nodules = case["nodules"]
    probabilities = _probabilities(case["table"])
    assert len(groups) == 2 and not np.isnan(probabilities[:2]).any() and np.isnan(probabilities[2])
    first = pydicom.dcmread(next(lidc_0001.glob("*.dcm")), stop_before_pixels=True)
    assert sr.StudyInstanceUID == first.StudyInstanceUID and sr.PatientID == first.PatientID
    for group, nodule, point, probability in zip(groups, nodules, points, probabilities):
        assert group.roi.frame_of_reference_uid == first.FrameOfReferenceUID
        np.testing.assert_allclose(group.roi.value, [nodule.centre_lps], atol=0.01, rtol=0)  # LPS, not RAS
        assert group.tracking_identifier == point.name
        (measured,) = group.get_measurements(name=PROBABILITY)
        assert measured.value == pytest.approx(probability, abs=1e-9)
        (label,) = group.get_qualitative_evaluations(name=hd.sr.CodedConcept(*LABEL_CONCEPT))
        assert label.value.meaning.lower() == ("malignant" if probability >= 0.5 else "benign")
    assert groups[0].roi.value.tolist() != groups[1].roi.value.tolist()
    assert "tta=none" in sr_text(groups[0][0], "Algorithm Parameters")  # the set the rows say they were scored with
    (evidence,) = pydicom.dcmread(out).CurrentRequestedProcedureEvidenceSequence
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence} == \
        set(case["volume"].GetAttribute("DICOM.instanceUIDs").split())

    # an earlier MedLoRA SR is replaced (the save dialog asked); the new one is another instance
    assert _write_in_process(case, out) == out and pydicom.dcmread(out).SOPInstanceUID != sr.SOPInstanceUID


def test_an_ensemble_scored_volume_exports_the_sr_score_writes_for_that_ensemble(case, ensemble_members, tmp_path):
    """Mean, spread, member probabilities and disagreement of the table's ensemble rows, under the ensemble's
    algorithm, as ``medlora score --sr`` reports them (test_ensemble_scoring.py checks those against the
    members scored alone)."""
    scene, logic, names = case["scene"], case["logic"], ["site-a", "site-b"]
    for name in names:
        assert logic.importAdapter(str(ensemble_members[name])) == name
    table = None
    try:
        table = _finish(logic, logic.beginScore(case["volume"], case["markups"], names, table=None, tta=False,
                                                device="cpu"), timeout_s=300).results_table
        rows = read_table(table)[:2]  # 'far' is not scored
        assert all(row.adapter == "site-a+site-b" and row.spread is not None for row in rows)
        job = _export(case, tmp_path / "ensemble.dcm", table=table)  # the child, from a JSON file
        assert job.written == tmp_path / "ensemble.dcm" and "2 nodules" in job.status
        groups = hd.sr.srread(job.written).content.get_planar_roi_measurement_groups()
        assert len(groups) == 2
        for group, nodule, row in zip(groups, case["nodules"], rows):
            np.testing.assert_allclose(group.roi.value, [nodule.centre_lps], atol=0.01, rtol=0)
            by_derivation, members = ensemble_probabilities(group)
            assert by_derivation == pytest.approx({"Mean": row.probability, "Standard Deviation": row.spread},
                                                  abs=1e-9)
            assert list(members) == names and members == pytest.approx(row.members, abs=1e-9)
            (disagree,) = group.get_qualitative_evaluations(name=hd.sr.CodedConcept(*DISAGREE_CONCEPT))
            assert disagree.value.meaning == ("Yes" if row.disagree else "No")
            assert sr_text(group[0], "Algorithm Name") == ["site-a+site-b"]
            assert sr_text(group[0], "Algorithm Version") == [row.adapter_version]
            parameters = sr_text(group[0], "Algorithm Parameters")
            assert "members=site-a,site-b" in parameters and "tta=none" in parameters
            for name in names:
                manifest = logic.session.store.info(name)
                assert any(f"member {name}: version={manifest.version_id} manifest_sha256={manifest_sha256(manifest)}"
                           in p for p in parameters)
        assert any(row.disagree for row in rows) or all(row.spread > 0 for row in rows)

        # another volume's row scored by the members the other way round comes first: the table's member columns
        # follow it, but this volume's members keep the order they were combined in
        other = ScoreRow(volume="another", nodule="n", point_id="x", r=0.0, a=0.0, s=0.0, probability=0.5, label=1,
                         adapter="site-b+site-a", adapter_version="x+y", spread=0.1, disagree=False,
                         members={"site-b": 0.6, "site-a": 0.4})
        write_table(scene, [other, *read_table(table)], table)
        titles = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        assert titles[-2:] == ["P site-b", "P site-a"]
        groups = hd.sr.srread(_write_in_process(case, tmp_path / "reordered.dcm", table=table)
                              ).content.get_planar_roi_measurement_groups()
        assert [list(ensemble_probabilities(group)[1]) for group in groups] == [names, names]

        # a member re-imported with other weights since the scores: refused, naming it
        member_rows = read_table(table)
        for row in member_rows:
            row.adapter_version = row.adapter_version.split("+")[0] + "+0123456789ab"
        write_table(scene, member_rows, table)
        with pytest.raises(SRError, match="adapter 'site-b' has changed since these scores"):
            logic.beginExportSR(case["volume"], table, tmp_path / "stale.dcm", dicomDatabase=case["database"])
        for row in member_rows:
            row.members.pop("site-b", None)
        write_table(scene, member_rows, table)
        with pytest.raises(SRError, match="does not name its members consistently"):
            logic.beginExportSR(case["volume"], table, tmp_path / "stale.dcm", dicomDatabase=case["database"])
        assert not (tmp_path / "stale.dcm").exists() and logic.job is None
    finally:
        if table is not None:
            scene.RemoveNode(table)


def test_points_go_back_through_the_volumes_transform_into_its_dicom_frame(case, tmp_path):
    """Volume and points moved together: the SR still gives the DICOM frame's coordinates."""
    import vtk

    scene, volume, markups, logic = case["scene"], case["volume"], case["markups"], case["logic"]
    before = [n.centre_lps for n in case["nodules"]]
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 30.0)
    matrix.SetElement(2, 3, -12.5)
    transform.SetMatrixTransformToParent(matrix)
    table = None
    try:
        for node in (volume, markups):
            node.SetAndObserveTransformNodeID(transform.GetID())
        table = _finish(logic, logic.beginScore(volume, markups, "tiny-sr", table=None, tta=False, device="cpu"),
                        timeout_s=300).results_table
        moved = [p.nodule.centre_lps for p in mrml.markups_to_points(markups)[:2]]
        assert np.allclose(np.array(moved) - before, [(-30.0, 0.0, -12.5)] * 2)  # the table holds world positions
        groups = hd.sr.srread(_write_in_process(case, tmp_path / "moved.dcm", table=table)
                              ).content.get_planar_roi_measurement_groups()
        np.testing.assert_allclose([g.roi.value[0] for g in groups], before, atol=0.01, rtol=0)
    finally:
        for node in (volume, markups):
            node.SetAndObserveTransformNodeID(None)
        if table is not None:
            scene.RemoveNode(table)
        scene.RemoveNode(transform)


def test_a_volume_without_dicom_origin_is_refused_with_what_to_do(case, tmp_path):
    ct = case["ct"]  # as a NRRD or NIfTI file loads: the image without any DICOM identifiers
    nrrd = mrml.add_volume_node(case["scene"], CTImage(voxels_hu=ct.voxels_hu, geometry=ct.geometry), name="ct")
    ours = mrml.add_volume_node(case["scene"], case["ct"], name="read by MedLoRA")  # UIDs, but no instances
    out = tmp_path / "none.dcm"
    for volume in (nrrd, ours):
        with pytest.raises(SRError, match="needs the DICOM series: load it through the DICOM module"):
            case["logic"].beginExportSR(volume, case["table"], out, dicomDatabase=case["database"])
    assert case["logic"].job is None and not out.exists()


def test_an_existing_file_medlora_did_not_write_is_never_replaced(case, tmp_path):
    foreign = tmp_path / "foreign.dcm"
    foreign.write_bytes(b"somebody else's report")
    shutil.copy(next(Path(case["database"].fileForInstance(
        case["volume"].GetAttribute("DICOM.instanceUIDs").split()[0])).parent.glob("*.dcm")), tmp_path / "ct.dcm")
    before = tree_digest(tmp_path)
    for path in (foreign, tmp_path / "ct.dcm"):  # not DICOM; DICOM, but a CT image
        for overwrite in (True, False):
            with pytest.raises(SRError, match="left untouched|already exists"):
                case["logic"].beginExportSR(case["volume"], case["table"], path, overwrite=overwrite,
                                            dicomDatabase=case["database"])
    with pytest.raises(SRError, match="is a folder"):
        case["logic"].beginExportSR(case["volume"], case["table"], tmp_path, dicomDatabase=case["database"])
    assert tree_digest(tmp_path) == before and case["logic"].job is None


def test_rows_files_and_adapters_that_do_not_fit_are_refused(case, tmp_path):
    logic, volume, table = case["logic"], case["volume"], case["table"]
    out = tmp_path / "sr.dcm"
    with pytest.raises(SRError, match="no longer has the files of 133 of the 133 images"):
        logic.beginExportSR(volume, table, out, dicomDatabase=sr_export.FolderDicomIndex(tmp_path))
    with pytest.raises(SRError, match="no results table: score the volume first"):
        logic.beginExportSR(volume, None, out, dicomDatabase=case["database"])
    other = case["scene"].AddNewNodeByClass("vtkMRMLTableNode", "other")
    rows = read_table(table)
    for row in rows:
        row.volume = "another volume"
    write_table(case["scene"], rows, other)
    with pytest.raises(SRError, match="has no row of '1: LIDC CT'"):
        logic.beginExportSR(volume, other, out, dicomDatabase=case["database"])
    for row in rows:
        row.volume, row.adapter_version = volume.GetName(), "0123456789ab"
    write_table(case["scene"], rows, other)
    with pytest.raises(SRError, match="adapter 'tiny-sr' has changed since these scores"):
        logic.beginExportSR(volume, other, out, dicomDatabase=case["database"])
    case["scene"].RemoveNode(other)
    assert not out.exists() and logic.job is None


def test_cancel_leaves_no_file_and_a_broken_interpreter_is_reported(case, tmp_path):
    logic = case["logic"]
    out = tmp_path / "cancelled.dcm"
    job = logic.beginExportSR(case["volume"], case["table"], out, dicomDatabase=case["database"])
    logic.cancelJob()
    deadline = time.monotonic() + 30
    while logic.busy() and time.monotonic() < deadline:
        logic.tick()
        time.sleep(0.05)
    assert job.finished and job.written is None and "cancelled" in job.status
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and not job.request_file.exists()

    python = shutil.which("python3", path="/usr/bin")
    if python is None or subprocess.run([python, "-c", "import numpy"], capture_output=True).returncode == 0:
        pytest.skip("no system python3 without numpy to stand for a broken engine interpreter")
    saved = logic.enginePython()
    logic.setEnginePython(python)  # a Python without MedLoRA's packages
    try:
        with pytest.raises(MedLoRAError, match=r"DICOM SR of '1: LIDC CT' not written: the SR writer stopped"):
            _export(case, tmp_path / "broken.dcm")
    finally:
        logic.setEnginePython(saved)
    assert logic.job is None and not (tmp_path / "broken.dcm").exists()
