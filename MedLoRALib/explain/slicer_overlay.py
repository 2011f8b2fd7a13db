"""Show an explanation volume over the CT in Slicer's slice views (torch-free, MRML only).

The NRRD written by ``medlora explain`` (or the engine's maps put back with
``explain.volume``) becomes a scalar volume node read by MRML's own archetype storage
node, so its LPS header becomes the node's IJK→RAS matrix exactly as Slicer's "Add data"
would do it. It is then set as the foreground layer of every slice view, over the CT as
background, with a MedLoRA colour table whose low end is transparent and a layer opacity.

MRML calls used (Slicer ``Libs/MRML/Core``, the same in v5.4.0 and v5.10.0):
``vtkMRMLVolumeArchetypeStorageNode.SetFileName/ReadData``,
``vtkMRMLScalarVolumeDisplayNode.SetAndObserveColorNodeID/AutoWindowLevelOff/SetWindowLevelMinMax``,
``vtkMRMLColorTableNode.SetTypeToUser/SetNumberOfColors/SetColor(entry, name, r, g, b, a)`` — a
colour with alpha 0 is transparent in the slice view because the display node ANDs the lookup
table's alpha into the layer's alpha (``vtkMRMLScalarVolumeDisplayNode.cxx``: ``ExtractAlpha`` →
``MultiplyAlpha`` → ``AlphaLogic``), and
``vtkMRMLSliceCompositeNode.SetForegroundVolumeID/SetForegroundOpacity/SetBackgroundVolumeID``
on every composite node, as ``slicer.util.setSliceViewerLayers`` does.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import numpy as np

from ..errors import MedLoRAError
from ..image import CTImage
from .volume import SaliencyVolume

#: Attribute marking the volume nodes MedLoRA added as explanations.
EXPLANATION_ATTRIBUTE = "MedLoRA.explanation"
_TABLE_NAMES = {False: "MedLoRA saliency", True: "MedLoRA saliency (signed)"}
_ENTRIES = 256


def load_explanation(scene, path: str | os.PathLike, name: str | None = None):
    """Read an explanation NRRD into a new scalar volume node (its grid exactly as in the file)."""
    path = Path(path)
    if not path.is_file():
        raise MedLoRAError(f"explanation file {path} does not exist: run medlora explain first")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or path.stem)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise MedLoRAError(f"cannot read explanation {path}: is it a NRRD written by medlora explain?")
    node.SetAttribute(EXPLANATION_ATTRIBUTE, "1")
    return node


def add_explanation(scene, volume: SaliencyVolume, name: str = "explanation"):
    """A new scalar volume node holding ``volume`` on its own grid (no file in between)."""
    from ..slicer.mrml import add_volume_node

    node = add_volume_node(scene, CTImage(voxels_hu=volume.values, geometry=volume.geometry), name)
    node.SetAttribute(EXPLANATION_ATTRIBUTE, volume.method or "1")
    return node


def maps_from_response(result: dict) -> tuple[np.ndarray, int]:
    """The ``(maps, cell_px)`` of an engine ``explain`` response, decoded without torch."""
    try:
        blob = result["maps"]
        shape = [int(n) for n in blob["shape"]]
        raw = base64.b64decode(blob["data"], validate=True)
        maps = np.frombuffer(raw, dtype=np.float32).reshape(shape)
        return maps, int(result["cell_px"])
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise MedLoRAError(f"the engine's explain response is malformed ({exc}); restart the engine") from exc


def _ramp(fraction: float, signed: bool) -> tuple[float, float, float]:
    """Heat colours (black-red-yellow-white) for maps ≥ 0; blue-white-red for signed maps."""
    if signed:
        t = 2.0 * fraction - 1.0
        return (1.0, 1.0 - t, 1.0 - t) if t >= 0 else (1.0 + t, 1.0 + t, 1.0)
    return (min(1.0, 3.0 * fraction), min(1.0, max(0.0, 3.0 * fraction - 1.0)),
            min(1.0, max(0.0, 3.0 * fraction - 2.0)))


def colour_table(scene, signed: bool = False, transparent_below: float = 0.2):
    """MedLoRA's colour table (reused when already in the scene).

    Args:
        signed: blue (negative) to red (positive) around a transparent zero, for gradient × input;
            otherwise a heat ramp for non-negative maps (attention rollout).
        transparent_below: fraction of the display range (of |value| for signed maps) drawn
            fully transparent, so weak saliency does not hide the CT.
    """
    name = _TABLE_NAMES[bool(signed)]
    existing = scene.GetFirstNodeByName(name)
    table = existing if existing is not None and existing.IsA("vtkMRMLColorTableNode") else None
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    table.SetTypeToUser()
    table.SetNumberOfColors(_ENTRIES)
    for entry in range(_ENTRIES):
        fraction = entry / (_ENTRIES - 1)
        strength = abs(2.0 * fraction - 1.0) if signed else fraction
        alpha = 0.0 if strength < transparent_below else 1.0
        table.SetColor(entry, f"{fraction:.3f}", *_ramp(fraction, signed), alpha)
    return table


def show_explanation(scene, explanation_node, ct_node=None, opacity: float = 0.5, signed: bool | None = None,
                     transparent_below: float = 0.2):
    """Make ``explanation_node`` the coloured foreground of every slice view (CT as background).

    Args:
        explanation_node: a scalar volume node (``load_explanation``).
        ct_node: the CT volume node to keep as background (None: leave the background as is).
        opacity: foreground layer opacity in [0, 1].
        signed: use the signed colour table; None decides from the data (any negative value).

    Returns:
        The colour table node.
    """
    if explanation_node is None or not explanation_node.IsA("vtkMRMLScalarVolumeNode"):
        raise MedLoRAError("no explanation volume to show: load one with load_explanation first")
    if not 0.0 <= float(opacity) <= 1.0:
        raise MedLoRAError(f"overlay opacity must be between 0 and 1, got {opacity}")
    image = explanation_node.GetImageData()
    if image is None:
        raise MedLoRAError(f"explanation '{explanation_node.GetName()}' has no voxels")
    low, high = image.GetScalarRange()
    signed = low < 0 if signed is None else bool(signed)
    top = max(abs(low), abs(high)) if signed else high
    if not np.isfinite(top) or top <= 0:
        top = 1.0  # an all-zero map: nothing to see, but a valid window
    table = colour_table(scene, signed, transparent_below)
    if explanation_node.GetDisplayNode() is None:
        explanation_node.CreateDefaultDisplayNodes()
    display = explanation_node.GetDisplayNode()
    display.SetAndObserveColorNodeID(table.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(-top if signed else 0.0, top)
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if ct_node is not None:
            composite.SetBackgroundVolumeID(ct_node.GetID())
        composite.SetForegroundVolumeID(explanation_node.GetID())
        composite.SetForegroundOpacity(float(opacity))
    return table
