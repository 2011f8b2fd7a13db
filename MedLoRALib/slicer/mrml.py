"""MRML nodes ↔ MedLoRA records: volume nodes ↔ ``CTImage``, markups/ROI → ``Nodule``.

Slicer shows world coordinates in RAS; MedLoRA works in LPS. Every conversion here
goes through the node's IJK→RAS matrix and, for volumes under a linear parent
transform, the transform to world, so patches are cut where the user sees the
point. Control point positions are read in world coordinates (any parent transform
applied). ``arrayFromVolume`` order is ``[k, j, i]``, the same as ``CTImage``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import MedLoRAError
from ..geometry import Geometry, lps_to_ras, ras_to_lps
from ..image import CTImage, StudyIds
from ..nodule import Nodule
from .results import base_label

#: Node attribute naming the markups (fiducial or ROI) node that belongs to a volume.
MARKUPS_REFERENCE_ROLE = "MedLoRA.markups"
_LABEL_WORDS = {"benign": 0, "malignant": 1}
POSITION_DEFINED = 2  # vtkMRMLMarkupsNode::PositionDefined


@dataclass
class HeadlessScene:
    """A real MRML scene with the application logic and module logics it needs.

    Storage nodes, ``.mrb`` save/reload and slice views need these logics registered
    with the application logic. The application logic keeps only raw pointers to the
    module logics, so this record keeps the Python references alive.
    """

    scene: object
    app_logic: object
    logics: dict = field(default_factory=dict)


def create_headless_scene(set_global: bool = True) -> HeadlessScene:
    """A scene like Slicer's (volumes, markups, tables, plots, subject hierarchy) without Qt.

    Args:
        set_global: also make it ``slicer.mrmlScene`` so ``slicer.util`` helpers work.
    """
    import slicer
    from vtkmodules.vtkCommonCore import vtkCollection

    scene = slicer.vtkMRMLScene()
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtkCollection())
    app_logic.SetViewLogics(vtkCollection())
    slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app_logic)
    logics = {}
    for name, cls in (("Volumes", slicer.vtkSlicerVolumesLogic), ("Markups", slicer.vtkSlicerMarkupsLogic),
                      ("Tables", slicer.vtkSlicerTablesLogic), ("Plots", slicer.vtkSlicerPlotsLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    if set_global:
        slicer.mrmlScene = scene
    return HeadlessScene(scene=scene, app_logic=app_logic, logics=logics)


# --- volumes ------------------------------------------------------------------------

def _vtk_matrix_to_array(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_world_ras_from_ijk(volume_node) -> np.ndarray:
    """4×4 world-RAS-from-IJK of a volume node, with its parent transform applied."""
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = _vtk_matrix_to_array(ijk_to_ras)
    transform_node = volume_node.GetParentTransformNode()
    if transform_node is not None:
        if not transform_node.IsTransformToWorldLinear():
            raise MedLoRAError(
                f"volume '{volume_node.GetName()}' is under the non-linear transform "
                f"'{transform_node.GetName()}': harden the transform (Data module, right-click → "
                "Harden transform) so MedLoRA can sample the original voxels.")
        to_world = vtk.vtkMatrix4x4()
        transform_node.GetMatrixTransformToWorld(to_world)
        matrix = _vtk_matrix_to_array(to_world) @ matrix
    return matrix


def volume_to_ct_image(volume_node) -> CTImage:
    """The volume node's voxels (no copy) and its world grid in LPS as a ``CTImage``."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    name = volume_node.GetName() if volume_node is not None else None
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise MedLoRAError(f"{name or 'no volume'} is not a scalar volume: select a CT volume node.")
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise MedLoRAError(f"volume '{name}' has no voxel data: load the CT again.")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise MedLoRAError(f"volume '{name}' has {image_data.GetNumberOfScalarComponents()} components per "
                           "voxel; MedLoRA needs a single-component CT in Hounsfield units.")
    size_ijk = image_data.GetDimensions()
    voxels = vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(tuple(reversed(size_ijk)))
    try:
        geometry = Geometry.from_ras_from_ijk(volume_world_ras_from_ijk(volume_node), size_ijk)
    except ValueError as exc:
        raise MedLoRAError(f"volume '{name}' has a sheared or scaled grid ({exc}); harden or remove the "
                           "transform that scales it.") from exc
    return CTImage(voxels_hu=voxels, geometry=geometry, ids=dicom_ids(volume_node), source=name)


def dicom_ids(volume_node) -> StudyIds:
    """Patient, study and series identifiers of a volume node.

    Slicer's DICOM loader keeps them in the subject hierarchy (the UIDs of the series, study
    and patient items above the volume), not on the volume node; MedLoRA's own volumes carry
    them as node attributes. Either source is used.
    """
    import slicer

    found = {level: volume_node.GetAttribute(f"DICOM.{tag}") or ""
             for level, tag in (("Patient", "PatientID"), ("Study", "StudyInstanceUID"),
                                ("Series", "SeriesInstanceUID"))}
    scene = volume_node.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene else None
    item = hierarchy.GetItemByDataNode(volume_node) if hierarchy else 0
    if item:
        found["Series"] = found["Series"] or hierarchy.GetItemUID(item, "DICOM") or ""
        item = hierarchy.GetItemParent(item)
        while item and item != hierarchy.GetSceneItemID():
            level = hierarchy.GetItemLevel(item)
            if level in found and not found[level]:
                found[level] = (hierarchy.GetItemAttribute(item, "DICOM.PatientID") if level == "Patient" else
                                "") or hierarchy.GetItemUID(item, "DICOM") or ""
            item = hierarchy.GetItemParent(item)
    return StudyIds(patient_id=found["Patient"], study_uid=found["Study"], series_uid=found["Series"])


def _set_ijk_to_ras(volume_node, geometry: Geometry) -> None:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    ras_from_ijk = geometry.ras_from_ijk
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ras_from_ijk[r, c]))
    volume_node.SetIJKToRASMatrix(matrix)


def add_volume_node(scene, image: CTImage, name: str = "CT"):
    """Add a scalar volume node holding a copy of ``image`` on the same world grid."""
    import vtk
    from vtkmodules.util.numpy_support import numpy_to_vtk

    voxels = np.ascontiguousarray(image.voxels_hu)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*image.geometry.size)
    scalars = numpy_to_vtk(voxels.ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image_data)
    _set_ijk_to_ras(node, image.geometry)
    for key, value in (("DICOM.PatientID", image.ids.patient_id), ("DICOM.StudyInstanceUID", image.ids.study_uid),
                       ("DICOM.SeriesInstanceUID", image.ids.series_uid)):
        if value:
            node.SetAttribute(key, value)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(1500.0, -600.0)  # lung window
    return node


# --- markups -------------------------------------------------------------------------

@dataclass(frozen=True)
class ScenePoint:
    """One nodule the user marked in the scene, in both frames.

    Args:
        index: control point index in its markups node (or 0 for an ROI).
        point_id: the control point's ID (stable across reordering) or the ROI node ID.
        name: the label the user sees, without the score MedLoRA appended to it.
        position_ras: world RAS mm, as Slicer shows it.
        nodule: the same place as a ``Nodule`` in LPS.
        training_label: 0 benign, 1 malignant, ``None`` unlabelled.
    """

    index: int
    point_id: str
    name: str
    position_ras: tuple[float, float, float]
    nodule: Nodule
    training_label: int | None = None


def parse_training_label(text: str) -> int | None:
    """Label from a control point description: its first word ``benign``/``malignant``.

    Descriptions MedLoRA writes ("MedLoRA: …") never count, so scores are never
    mistaken for the truth.
    """
    words = text.replace(",", " ").replace(":", " ").split()
    return _LABEL_WORDS.get(words[0].lower()) if words else None


def training_labels_attribute(markups_node) -> dict[str, int]:
    """Labels set in the widget, stored on the node as ``MedLoRA.labels`` (``id=0;id=1``)."""
    raw = markups_node.GetAttribute("MedLoRA.labels") or ""
    labels = {}
    for item in filter(None, raw.split(";")):
        key, _, value = item.partition("=")
        if value in ("0", "1"):
            labels[key] = int(value)
    return labels


def set_training_label(markups_node, point_id: str, label: int | None) -> None:
    """Set (or clear with ``None``) the widget label of one control point."""
    labels = training_labels_attribute(markups_node)
    if label is None:
        labels.pop(point_id, None)
    elif label in (0, 1):
        labels[point_id] = int(label)
    else:
        raise MedLoRAError(f"training label must be 0 (benign) or 1 (malignant), got {label!r}")
    markups_node.SetAttribute("MedLoRA.labels", ";".join(f"{k}={v}" for k, v in sorted(labels.items())))


def markups_to_points(markups_node, case_id: str = "") -> list[ScenePoint]:
    """Every control point of a fiducial node, or the centre and box of an ROI node.

    Positions are world RAS (parent transforms applied), converted to LPS.
    """
    if markups_node is None:
        raise MedLoRAError("no markups selected: place points on the nodules (or an ROI) first.")
    if markups_node.IsA("vtkMRMLMarkupsROINode"):
        return [_roi_point(markups_node, case_id)]
    if not markups_node.IsA("vtkMRMLMarkupsNode"):
        raise MedLoRAError(f"'{markups_node.GetName()}' is not a markups point list or ROI.")
    widget_labels = training_labels_attribute(markups_node)
    points = []
    for index in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(index) != POSITION_DEFINED:
            continue  # no position: reported by ``unplaced_points``
        position_ras = np.zeros(3)
        markups_node.GetNthControlPointPositionWorld(index, position_ras)
        point_id = markups_node.GetNthControlPointID(index)
        name = base_label(markups_node.GetNthControlPointLabel(index)) or f"{markups_node.GetName()}-{index + 1}"
        label = widget_labels.get(point_id, parse_training_label(markups_node.GetNthControlPointDescription(index)))
        nodule = Nodule(centre_lps=tuple(ras_to_lps(position_ras)), nodule_id=name, case_id=case_id,
                        label=label, source=f"slicer:{markups_node.GetName()}")
        points.append(ScenePoint(index=index, point_id=point_id, name=name,
                                 position_ras=tuple(float(v) for v in position_ras),
                                 nodule=nodule, training_label=label))
    return points


@dataclass(frozen=True)
class UnplacedPoint:
    """A control point without a position (not placed yet, being placed, or marked missing)."""

    index: int
    point_id: str
    name: str
    reason: str


_STATUS_WORDS = {0: "is not placed yet", 1: "is still being placed", 3: "is marked missing (skipped)"}


def unplaced_points(markups_node) -> list[UnplacedPoint]:
    """The control points ``markups_to_points`` leaves out, each with why: never dropped silently.

    Slicer's position status (``vtkMRMLMarkupsNode``: 0 undefined, 1 preview, 2 defined,
    3 missing) says whether a point has a position; only defined ones are scored.
    """
    if markups_node is None or markups_node.IsA("vtkMRMLMarkupsROINode"):
        return []
    found = []
    for index in range(markups_node.GetNumberOfControlPoints()):
        status = markups_node.GetNthControlPointPositionStatus(index)
        if status == POSITION_DEFINED:
            continue
        name = base_label(markups_node.GetNthControlPointLabel(index)) or f"{markups_node.GetName()}-{index + 1}"
        found.append(UnplacedPoint(
            index=index, point_id=markups_node.GetNthControlPointID(index), name=name,
            reason=(f"warning: point '{name}' of '{markups_node.GetName()}' "
                    f"{_STATUS_WORDS.get(status, f'has no position (status {status})')}: place it on the nodule "
                    "(Markups module) or delete it; it was not scored")))
    return found


def _roi_point(roi_node, case_id: str) -> ScenePoint:
    centre_ras = np.zeros(3)
    roi_node.GetCenterWorld(centre_ras)
    bounds = np.zeros(6)
    roi_node.GetRASBounds(bounds)  # world, axis-aligned
    corners_lps = ras_to_lps(np.array([[bounds[0], bounds[2], bounds[4]], [bounds[1], bounds[3], bounds[5]]]))
    box_lps = (tuple(corners_lps.min(axis=0)), tuple(corners_lps.max(axis=0)))
    size = np.array(box_lps[1]) - np.array(box_lps[0])
    name = roi_node.GetName()
    label = parse_training_label(roi_node.GetDescription() or "")
    nodule = Nodule(centre_lps=tuple(ras_to_lps(centre_ras)), nodule_id=name, case_id=case_id,
                    diameter_mm=float(size.max()), box_lps=box_lps, label=label, source=f"slicer:{name}")
    return ScenePoint(index=0, point_id=roi_node.GetID(), name=name,
                      position_ras=tuple(float(v) for v in centre_ras),
                      nodule=nodule, training_label=label)


def add_markups_node(scene, nodules: list[Nodule], name: str = "Nodules"):
    """A fiducial node with one control point per nodule (LPS centres shown in RAS)."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.CreateDefaultDisplayNodes()
    for nodule in nodules:
        node.AddControlPointWorld(*lps_to_ras(nodule.centre_lps), nodule.nodule_id or "")
    return node


def markups_for_volume(volume_node):
    """The markups node a volume references (``MedLoRA.markups``), if any."""
    return volume_node.GetNodeReference(MARKUPS_REFERENCE_ROLE)


def link_markups(volume_node, markups_node) -> None:
    """Remember which markups belong to which volume (saved with the scene)."""
    volume_node.SetNodeReferenceID(MARKUPS_REFERENCE_ROLE, markups_node.GetID() if markups_node else None)
