"""The three slice views: which volume they show, its window/level, where they are centred.

The views are trame-slicer's, each with Slicer's own slice logic and displayable managers
(volumes, markups). Window/level presets set the volume's display node, as Slicer's
Volumes module does. Without an X display their render windows are EGL ones
(``prefer_egl_without_display``).
"""

from __future__ import annotations

import ctypes.util
import os
from collections.abc import MutableMapping

import numpy as np

#: name -> (window, level) in HU
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 40.0),
    "bone": (2000.0, 300.0),
}
VIEW_NAMES = ("Red", "Yellow", "Green")  # axial, sagittal, coronal (Slicer's singleton tags)
EGL_WINDOW = "vtkEGLRenderWindow"


def prefer_egl_without_display(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Without an X display, ask VTK for an EGL render window (where libEGL is installed).

    VTK 9.4+ chooses the OpenGL window class when the first render window is made
    (``vtkOpenGLRenderWindow::New``, Rendering/OpenGL2/vtkOpenGLRenderWindow.cxx, v9.6.0): unless
    ``VTK_DEFAULT_OPENGL_WINDOW`` names one, it tries X first, and with no display
    ``vtkXOpenGLRenderWindow::EnsureGLX`` warns "bad X server connection. DISPLAY=" before it
    falls back to EGL. trame-slicer's views render off screen (``views/abstract_view.py``,
    ``SetOffScreenRendering(1)``) but are made through that same choice. Naming EGL skips the X
    probe and gives the window the fallback gave anyway. A user's own setting wins. Returns the
    value set, or ``None`` when nothing was changed.
    """
    if environ.get("DISPLAY") or environ.get("VTK_DEFAULT_OPENGL_WINDOW") or not ctypes.util.find_library("EGL"):
        return None
    environ["VTK_DEFAULT_OPENGL_WINDOW"] = EGL_WINDOW
    return EGL_WINDOW


def layout():
    """Axial view large on the left, coronal and sagittal stacked on the right (no 3D view)."""
    from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

    return Layout(LayoutDirection.Horizontal, [
        ViewLayoutDefinition.axial_view(),
        Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view()]),
    ])


def slice_views(slicer_app) -> list:
    return slicer_app.view_manager.get_slice_views()


def show_volume(slicer_app, volume_node) -> None:
    """Show a volume in every slice view, fitted to the view."""
    for view in slice_views(slicer_app):
        view.set_background_volume_id(volume_node.GetID())
        view.set_foreground_volume_id(None)
        view.fit_view_to_content()


def set_window(volume_node, preset: str) -> None:
    from ..errors import MedLoRAError

    if preset not in WINDOW_PRESETS:
        raise MedLoRAError(f"window preset '{preset}': choose one of {', '.join(WINDOW_PRESETS)}.")
    display = volume_node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(*WINDOW_PRESETS[preset])


def centre_on(slicer_app, point_ras) -> None:
    """Move every slice view so that it passes through ``point_ras`` with the point in its middle."""
    r, a, s = (float(v) for v in point_ras)
    for view in slice_views(slicer_app):
        view.get_view_node().JumpSliceByCentering(r, a, s)


def geometry(slicer_app) -> dict[str, dict]:
    """Each slice view's map from its pixels to world RAS, for the page (and its tests).

    ``xy_to_ras`` is Slicer's ``vtkMRMLSliceNode::GetXYToRAS`` (x right, y up, from the
    bottom-left of the render window); ``size`` is the render window's size in pixels.
    """
    found = {}
    for view in slice_views(slicer_app):
        node = view.get_view_node()
        matrix = node.GetXYToRAS()
        found[node.GetName()] = {
            "xy_to_ras": np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]).round(6).tolist(),
            "size": list(view.render_window().GetSize()),
            "orientation": node.GetOrientation(),
        }
    return found
