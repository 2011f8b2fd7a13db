"""Slice views drawn by Slicer's own displayable managers, saved to PNG.

The picture is what a user sees in a slice view: the volume through its display node's
window/level and the markups drawn by Slicer's markups displayable manager, with their
colours and labels. It works inside Slicer and with ``slicer-core`` alone; off screen it
needs an X server (``Xvfb``, see ``virtual_display``) or VTK's own off-screen fallback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MedLoRAError

_SLICE_DISPLAYABLE_MANAGERS = ("vtkMRMLMarkupsDisplayableManager",)


@dataclass
class RenderedView:
    """Where the picture went and where each control point landed on it.

    Args:
        path: the PNG.
        size: (width, height) in pixels.
        points_px: control point label → (column, row) in the PNG (row 0 at the top).
        xy_from_ras: 4×4 map from world RAS to view pixels (x right, y up from the bottom).
    """

    path: Path
    size: tuple[int, int]
    points_px: dict[str, tuple[float, float]]
    xy_from_ras: np.ndarray

    def pixel_of(self, point_ras) -> tuple[float, float]:
        """(column, row) in the PNG of a world RAS point on the slice."""
        x, y, _, _ = self.xy_from_ras @ np.append(np.asarray(point_ras, float), 1.0)
        return float(x), float(self.size[1] - 1 - y)


@contextlib.contextmanager
def virtual_display(width: int = 1280, height: int = 1024) -> Iterator[str | None]:
    """Run an ``Xvfb`` X server for off-screen rendering when there is no display.

    Yields the display name (``None`` when a display already exists or Xvfb is not
    installed, in which case VTK falls back to its own off-screen rendering).
    """
    if os.environ.get("DISPLAY") or shutil.which("Xvfb") is None:
        yield None
        return
    read_fd, write_fd = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{width}x{height}x24",
                               "-nolisten", "tcp"], pass_fds=(write_fd,), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as reader:
        number = reader.readline().strip()
    if not number:
        server.kill()
        raise MedLoRAError("Xvfb did not start; install Debian's xvfb or run with a display.")
    display = f":{number}"
    os.environ["DISPLAY"] = display
    try:
        yield display
    finally:
        os.environ.pop("DISPLAY", None)
        server.terminate()
        server.wait(timeout=10)


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def render_slice_view(volume_node, markups_node, out_png: str | os.PathLike, app_logic=None,
                      orientation: str = "Axial", centre_ras=None, size: tuple[int, int] = (512, 512),
                      field_of_view_mm: float | None = None, glyph_scale: float | None = None) -> RenderedView:
    """Render a slice view of a volume with markups (labels and colours as in Slicer) to PNG.

    Args:
        volume_node: the background volume.
        markups_node: markups drawn on top (or ``None``).
        out_png: where to write the picture.
        app_logic: the application logic (``slicer.app.applicationLogic()`` in Slicer; the
            ``HeadlessScene.app_logic`` otherwise).
        orientation: ``Axial``, ``Coronal`` or ``Sagittal``.
        centre_ras: world RAS point at the centre of the view (default: first control point,
            else the volume's centre).
        size: (width, height) in pixels.
        field_of_view_mm: width of the view in mm (default: the whole volume).
        glyph_scale: control point size in % of the view (default: the display node's).
    """
    import slicer
    import vtk

    if app_logic is None:
        app_logic = slicer.app.applicationLogic() if hasattr(slicer, "app") else None
    if app_logic is None or app_logic.GetSliceLogics() is None:
        raise MedLoRAError("rendering needs the application logic with slice logics "
                           "(use mrml.create_headless_scene() outside Slicer)")
    scene = volume_node.GetScene()
    width, height = (int(v) for v in size)

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width, height)
    renderer = vtk.vtkRenderer()
    renderer.GetActiveCamera().ParallelProjectionOn()
    window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    interactor.Initialize()

    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(app_logic)
    for manager in _SLICE_DISPLAYABLE_MANAGERS:
        if not factory.IsDisplayableManagerRegistered(manager):
            factory.RegisterDisplayableManager(manager)
    managers = slicer.vtkMRMLDisplayableManagerGroup()
    managers.Initialize(factory, renderer)

    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLApplicationLogic(app_logic)
    slice_logic.SetMRMLScene(scene)
    app_logic.GetSliceLogics().AddItem(slice_logic)
    slice_node = slice_logic.AddSliceNode("MedLoRARender")
    composite = slice_logic.GetSliceCompositeNode()
    try:
        managers.SetMRMLDisplayableNode(slice_node)
        slice_node.SetOrientation(orientation)
        composite.SetBackgroundVolumeID(volume_node.GetID())
        slice_logic.ResizeSliceNode(width, height)
        slice_logic.FitSliceToBackground()
        if field_of_view_mm:
            slice_node.SetFieldOfView(field_of_view_mm, field_of_view_mm * height / width,
                                      slice_node.GetFieldOfView()[2])
        if centre_ras is None and markups_node is not None and markups_node.GetNumberOfControlPoints():
            centre_ras = np.zeros(3)
            markups_node.GetNthControlPointPositionWorld(0, centre_ras)
        if centre_ras is not None:
            slice_node.JumpSliceByCentering(*(float(v) for v in centre_ras))
        if markups_node is not None and glyph_scale is not None:
            markups_node.GetDisplayNode().SetGlyphScale(glyph_scale)
            markups_node.GetDisplayNode().SetTextScale(glyph_scale)

        mapper = vtk.vtkImageMapper()
        mapper.SetColorWindow(255)
        mapper.SetColorLevel(127.5)
        mapper.SetInputConnection(slice_logic.GetImageDataConnection())
        image_actor = vtk.vtkActor2D()
        image_actor.SetMapper(mapper)
        image_actor.GetProperty().SetDisplayLocationToBackground()
        renderer.AddViewProp(image_actor)
        window.Render()

        grabber = vtk.vtkWindowToImageFilter()
        grabber.SetInput(window)
        grabber.ReadFrontBufferOff()
        grabber.Update()
        out_png = Path(out_png)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_png.with_name(f".{out_png.name}.tmp.png")
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(tmp))
        writer.SetInputConnection(grabber.GetOutputPort())
        writer.Write()
        os.replace(tmp, out_png)

        xy_from_ras = np.linalg.inv(_matrix(slice_node.GetXYToRAS()))
        view = RenderedView(path=out_png, size=(width, height), points_px={}, xy_from_ras=xy_from_ras)
        if markups_node is not None:
            for index in range(markups_node.GetNumberOfControlPoints()):
                point = np.zeros(3)
                markups_node.GetNthControlPointPositionWorld(index, point)
                view.points_px[markups_node.GetNthControlPointLabel(index)] = view.pixel_of(point)
        return view
    finally:
        managers.SetMRMLDisplayableNode(None)
        app_logic.GetSliceLogics().RemoveItem(slice_logic)
        slice_logic.SetMRMLScene(None)
        for node in (composite, slice_node):
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)
        window.Finalize()


def read_png(path: str | os.PathLike) -> np.ndarray:
    """A PNG as an (rows, columns, channels) uint8 array, row 0 at the top."""
    import vtk
    from vtkmodules.util.numpy_support import vtk_to_numpy

    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    image = reader.GetOutput()
    columns, rows, _ = image.GetDimensions()
    pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(rows, columns, -1)
    return pixels[::-1]  # VTK stores the bottom row first
