"""The Slicer logic on a real MRML scene (slicer-core, no Qt): geometry, patches, tables, .mrb."""

from __future__ import annotations

import csv
import zipfile

import numpy as np
import pytest
from helpers import rotation

from MedLoRALib.errors import MedLoRAError
from MedLoRALib.geometry import Geometry, lps_to_ras, ras_to_lps
from MedLoRALib.image import CTImage
from MedLoRALib.patches import PatchSpec, extract_patches
from MedLoRALib.slicer import mrml, results
from MedLoRALib.slicer.scoring import cut_patches

pytest.importorskip("slicer")


@pytest.fixture()
def headless():
    return mrml.create_headless_scene()


@pytest.fixture(scope="module")
def oblique_ct() -> CTImage:
    """A CT with anisotropic spacing and a rotated (non-identity) direction, plus a bright blob."""
    direction = rotation("z", 25) @ rotation("x", 10)
    geometry = Geometry(size=(64, 56, 40), spacing=(0.7, 0.8, 1.5), origin_lps=(-30.0, -10.0, -40.0),
                        direction=direction)
    k, j, i = np.mgrid[0:40, 0:56, 0:64]
    rng = np.random.default_rng(0)
    voxels = -800 + 60 * rng.standard_normal((40, 56, 64))
    voxels[(i - 30) ** 2 / 64 + (j - 28) ** 2 / 49 + (k - 20) ** 2 / 16 < 1] = 40
    return CTImage(voxels_hu=voxels.astype(np.int16), geometry=geometry)


def test_volume_node_round_trip_keeps_the_lps_grid(headless, oblique_ct):
    node = mrml.add_volume_node(headless.scene, oblique_ct)
    back = mrml.volume_to_ct_image(node)
    assert back.voxels_hu.shape == oblique_ct.voxels_hu.shape
    np.testing.assert_array_equal(back.voxels_hu, oblique_ct.voxels_hu)
    np.testing.assert_allclose(back.geometry.direction, oblique_ct.geometry.direction, atol=1e-9)
    np.testing.assert_allclose(back.geometry.spacing, oblique_ct.geometry.spacing, atol=1e-9)
    np.testing.assert_allclose(back.geometry.origin_lps, oblique_ct.geometry.origin_lps, atol=1e-9)
    # Slicer's own IJK→RAS agrees with MedLoRA's RAS-from-IJK (x and y flipped from LPS).
    np.testing.assert_allclose(mrml.volume_world_ras_from_ijk(node), oblique_ct.geometry.ras_from_ijk, atol=1e-9)


def test_patches_from_ras_markups_equal_medloralib_patches_in_lps(headless, oblique_ct):
    node = mrml.add_volume_node(headless.scene, oblique_ct)
    ijk = np.array([[30.0, 28.0, 20.0], [12.5, 40.2, 7.0], [50.0, 10.0, 33.0]])
    centres_lps = oblique_ct.geometry.ijk_to_lps(ijk)
    markups = headless.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nodules")
    for n, point_ras in enumerate(lps_to_ras(centres_lps)):
        markups.AddControlPointWorld(*point_ras, f"n{n}")
    markups.AddControlPointWorld(500.0, 500.0, 500.0, "far")
    spec = PatchSpec(views="multiview9", fov_mm=20.0, pixels=16)

    batch = cut_patches(node, markups, spec)

    expected = extract_patches(oblique_ct, centres_lps, spec)
    assert batch.inside.tolist() == [True, True, True, False]
    np.testing.assert_allclose(batch.patches, expected, atol=1e-5)
    assert set(batch.errors) == {3} and "outside volume" in batch.errors[3]
    # The blob sits at the first point: its axial view is bright in the centre.
    assert batch.patches[0, 0, 8, 8] > 0.6 and batch.patches[0, 0, 0, 0] < 0.3


def test_parent_transforms_are_applied_to_volume_and_points(headless, oblique_ct):
    import vtk

    node = mrml.add_volume_node(headless.scene, oblique_ct)
    transform = headless.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    world_from_local = np.eye(4)
    world_from_local[:3, :3] = rotation("y", 15)
    world_from_local[:3, 3] = (12.0, -7.0, 30.0)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, world_from_local[r, c])
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    # The point is placed in the volume's local frame and moves with it.
    local_ras = lps_to_ras(oblique_ct.geometry.ijk_to_lps(np.array([30.0, 28.0, 20.0])))
    markups = headless.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nodules")
    markups.AddControlPoint(*local_ras, "n0")
    markups.SetAndObserveTransformNodeID(transform.GetID())

    image = mrml.volume_to_ct_image(node)
    world_ras = (world_from_local @ np.append(local_ras, 1.0))[:3]
    np.testing.assert_allclose(image.geometry.lps_to_ijk(ras_to_lps(world_ras)), [30, 28, 20], atol=1e-6)
    spec = PatchSpec(views="ortho3", fov_mm=20.0, pixels=16)
    batch = cut_patches(node, markups, spec)
    np.testing.assert_allclose(batch.points[0].position_ras, world_ras, atol=1e-6)
    # Same voxels at the same relative place: the patch in the moved volume equals the
    # patch cut from the original volume with the same rotation of the sampling frame.
    lps_rotation = np.diag([-1, -1, 1.0]) @ world_from_local[:3, :3] @ np.diag([-1, -1, 1.0])
    expected = extract_patches(oblique_ct, oblique_ct.geometry.ijk_to_lps(np.array([[30.0, 28.0, 20.0]])), spec,
                               rotations=lps_rotation.T)
    np.testing.assert_allclose(batch.patches, expected, atol=1e-4)


def test_non_linear_parent_transform_asks_to_harden(headless, oblique_ct):
    node = mrml.add_volume_node(headless.scene, oblique_ct)
    grid = headless.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(MedLoRAError, match="harden"):
        mrml.volume_to_ct_image(node)


def test_roi_node_gives_centre_and_box_in_lps(headless):
    roi = headless.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "lesion")
    roi.SetCenterWorld(10.0, -20.0, 30.0)
    roi.SetSize(8.0, 12.0, 6.0)
    [point] = mrml.markups_to_points(roi, case_id="case")
    np.testing.assert_allclose(point.nodule.centre_lps, (-10.0, 20.0, 30.0))
    np.testing.assert_allclose(point.nodule.box_lps[0], (-14.0, 14.0, 27.0))
    np.testing.assert_allclose(point.nodule.box_lps[1], (-6.0, 26.0, 33.0))
    assert point.nodule.diameter_mm == pytest.approx(12.0)


def test_training_labels_from_widget_or_description_but_never_from_scores(headless):
    markups = headless.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nodules")
    for n in range(4):
        markups.AddControlPoint(float(n), 0.0, 0.0, f"n{n}")
    markups.SetNthControlPointDescription(0, "Malignant, spiculated")
    markups.SetNthControlPointDescription(1, "benign (calcified)")
    markups.SetNthControlPointDescription(2, "MedLoRA: probability 0.910, malignant at the adapter's threshold")
    mrml.set_training_label(markups, markups.GetNthControlPointID(3), 1)
    mrml.set_training_label(markups, markups.GetNthControlPointID(1), 0)
    labels = [p.training_label for p in mrml.markups_to_points(markups)]
    assert labels == [1, 0, None, 1]
    with pytest.raises(MedLoRAError):
        mrml.set_training_label(markups, markups.GetNthControlPointID(0), 3)


def _rows() -> list[results.ScoreRow]:
    return [results.ScoreRow("ct", "n0", "1", -1.0, 2.0, 3.0, 0.91, 1, "lidc", "2", False),
            results.ScoreRow("ct", "n1", "2", 4.0, -5.0, 6.0, 0.12, 0, "lidc", "2", True),
            results.ScoreRow("ct", "far", "3", 500.0, 500.0, 500.0, error="outside volume 'ct'")]


def test_results_table_colours_and_csv(headless, tmp_path):
    markups = headless.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nodules")
    for n, name in enumerate(["n0", "n1", "far"]):
        markups.AddControlPoint(float(n), 0.0, 0.0, name)
    markups.SetNthControlPointDescription(1, "benign")
    rows = _rows()
    table = results.write_table(headless.scene, rows)
    assert table.GetNumberOfRows() == 3
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == [c[0] for c in results.COLUMNS]
    assert results.read_table(table) == rows

    results.colour_control_points(markups, rows)
    results.colour_control_points(markups, rows)  # scoring again does not stack suffixes
    assert [markups.GetNthControlPointLabel(i) for i in range(3)] == ["n0 · 91% lidc", "n1 · 12% lidc (random-init)",
                                                                      "far · not scored"]
    assert [p.name for p in mrml.markups_to_points(markups)] == ["n0", "n1", "far"]  # the user's names
    assert [bool(markups.GetNthControlPointSelected(i)) for i in range(3)] == [True, False, False]
    assert markups.GetDisplayNode().GetSelectedColor() == pytest.approx(results.MALIGNANT_RGB)
    assert markups.GetNthControlPointDescription(1) == "benign"  # the user's label is kept
    assert "RANDOM-INIT" not in markups.GetNthControlPointDescription(0)
    assert "outside volume" in markups.GetNthControlPointDescription(2)

    out = results.export_csv(rows, tmp_path / "out" / "scores.csv")
    with open(out, newline="") as handle:
        records = list(csv.DictReader(handle))
    assert [r["nodule_id"] for r in records] == ["n0", "n1", "far"]
    assert records[0]["coordinate_system"] == "RAS" and float(records[0]["x"]) == -1.0
    assert records[2]["probability"] == "" and records[2]["error"]
    assert "label" not in records[0]  # a prediction must never be read back as a training label
    assert (records[0]["predicted_label"], records[0]["predicted_class"]) == ("malignant", "1")
    assert records[1]["random_init"] == "1"


def test_scene_with_results_saves_as_mrb_and_reloads(headless, oblique_ct, tmp_path):
    import slicer

    volume = mrml.add_volume_node(headless.scene, oblique_ct, name="chest")
    markups = mrml.add_markups_node(headless.scene, [], name="nodules")
    markups.AddControlPointWorld(-5.0, 7.5, -20.0, "n0")
    mrml.link_markups(volume, markups)
    rows = _rows()[:1]
    table = results.write_table(headless.scene, rows)
    results.colour_control_points(markups, rows)

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert headless.app_logic.SaveSceneToSlicerDataBundleDirectory(str(bundle), None)
    mrb = tmp_path / "session.mrb"
    assert headless.app_logic.Zip(str(mrb), str(bundle))
    assert any(n.endswith(".nrrd") for n in zipfile.ZipFile(mrb).namelist())

    reloaded = mrml.create_headless_scene()
    extract = tmp_path / "extract"
    extract.mkdir()
    assert reloaded.app_logic.Unzip(str(mrb), str(extract))
    mrml_file = next(extract.rglob("*.mrml"))
    reloaded.scene.SetURL(str(mrml_file))
    assert reloaded.scene.Import()

    volume2 = slicer.util.getFirstNodeByClassByName("vtkMRMLScalarVolumeNode", "chest", reloaded.scene)
    np.testing.assert_array_equal(mrml.volume_to_ct_image(volume2).voxels_hu, oblique_ct.voxels_hu)
    markups2 = mrml.markups_for_volume(volume2)
    assert markups2 is not None and markups2.GetNthControlPointLabel(0) == "n0 · 91% lidc"
    [table2] = [n for n in reloaded.scene.GetNodesByClass("vtkMRMLTableNode") if n.GetAttribute("MedLoRA.results")]
    restored = results.read_table(table2)
    assert restored[0].probability == pytest.approx(rows[0].probability)
    assert restored[0].label == 1 and restored[0].adapter == "lidc" and restored[0].nodule == "n0"
    assert table.GetNumberOfRows() == table2.GetNumberOfRows()


def test_engine_results_join_points_in_order_with_the_adapters_own_label_names(headless, oblique_ct):
    from MedLoRALib.slicer.scoring import rows_from_results

    node = mrml.add_volume_node(headless.scene, oblique_ct, name="ct")
    markups = headless.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nodules")
    markups.AddControlPointWorld(*lps_to_ras(oblique_ct.geometry.ijk_to_lps(np.array([30.0, 28.0, 20.0]))), "a")
    markups.AddControlPointWorld(500.0, 500.0, 500.0, "far")
    markups.AddControlPointWorld(*lps_to_ras(oblique_ct.geometry.ijk_to_lps(np.array([12.0, 40.0, 7.0]))), "b")
    batch = cut_patches(node, markups, PatchSpec(views="axial", fov_mm=20.0, pixels=8))
    answer = [{"probability": 0.7, "label": "needs biopsy", "adapter": "site", "adapter_version": "abc",
               "random_init": False},
              {"probability": 0.2, "label": "follow-up", "adapter": "site", "adapter_version": "abc",
               "random_init": False}]
    rows = rows_from_results(batch, answer, "site", "abc", ("follow-up", "needs biopsy"))
    assert [(r.nodule, r.probability, r.label, r.label_name) for r in rows] == [
        ("a", 0.7, 1, "needs biopsy"), ("far", None, None, ""), ("b", 0.2, 0, "follow-up")]
    assert results.read_table(results.write_table(headless.scene, rows)) == rows
    with pytest.raises(MedLoRAError, match="returned 1 results for 2 patches"):
        rows_from_results(batch, answer[:1], "site", "abc")


def test_patient_of_a_dicom_loaded_volume_comes_from_the_subject_hierarchy(headless, oblique_ct):
    """Slicer's DICOM loader puts patient and study in the subject hierarchy, not on the volume:
    two series of one patient must count as one patient (never split across train/validation)."""
    import slicer

    scene = headless.scene
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Anonymous")
    hierarchy.SetItemUID(patient, "DICOM", "PAT-7")
    hierarchy.SetItemAttribute(patient, "DICOM.PatientID", "PAT-7")
    study = hierarchy.CreateStudyItem(patient, "CT chest")
    hierarchy.SetItemUID(study, "DICOM", "1.2.3")
    ids = []
    for series_uid in ("1.2.3.4", "1.2.3.5"):
        volume = mrml.add_volume_node(scene, oblique_ct)
        item = hierarchy.GetItemByDataNode(volume) or hierarchy.CreateItem(study, volume)
        hierarchy.SetItemParent(item, study)
        hierarchy.SetItemUID(item, "DICOM", series_uid)
        ids.append(mrml.volume_to_ct_image(volume).ids)
    assert [i.patient_id for i in ids] == ["PAT-7", "PAT-7"]
    assert [i.study_uid for i in ids] == ["1.2.3", "1.2.3"]
    assert [i.series_uid for i in ids] == ["1.2.3.4", "1.2.3.5"]
