"""Slice views rendered by Slicer's displayable managers (slicer-core, off screen) on the real LIDC case."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from MedLoRALib.geometry import lps_to_ras
from MedLoRALib.slicer import mrml, render, results

pytest.importorskip("slicer")


def load_triton_before_mesa() -> None:
    """Mesa's software OpenGL loads its own libLLVM; importing triton (torch.compile's backend,
    pulled in by timm) after that crashes the process, so a test run that renders and later
    imports the model stack loads triton first."""
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("triton")


@pytest.fixture(scope="module")
def display():
    load_triton_before_mesa()
    with render.virtual_display() as name:
        yield name


@pytest.fixture(scope="module")
def lidc_case(lidc_0001):
    from MedLoRALib.annotations import load_nodules
    from MedLoRALib.ctio import load_ct

    image = load_ct(lidc_0001)
    [nodule] = load_nodules(next(lidc_0001.glob("*.xml")), image=image)
    return image, nodule


def _colour_mask(pixels: np.ndarray, rgb: tuple[float, float, float], tolerance: int = 40) -> np.ndarray:
    target = np.array(rgb) * 255
    return np.all(np.abs(pixels[..., :3].astype(float) - target) < tolerance, axis=-1)


def test_scored_control_point_is_drawn_in_its_colour_at_the_nodule(display, lidc_case, tmp_path):
    image, nodule = lidc_case
    headless = mrml.create_headless_scene()
    volume = mrml.add_volume_node(headless.scene, image, name="LIDC-IDRI-0001")
    centre_ras = lps_to_ras(nodule.centre_lps)
    benign_ras = centre_ras + np.array([-60.0, 0.0, 0.0])  # same axial slice, 60 mm to patient right
    markups = headless.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nodules")
    markups.AddControlPointWorld(*centre_ras, "n1")
    markups.AddControlPointWorld(*benign_ras, "n2")
    rows = [results.ScoreRow("LIDC-IDRI-0001", "n1", markups.GetNthControlPointID(0), *centre_ras, 0.87, 1, "a", "1"),
            results.ScoreRow("LIDC-IDRI-0001", "n2", markups.GetNthControlPointID(1), *benign_ras, 0.08, 0, "a", "1")]
    results.colour_control_points(markups, rows)

    view = render.render_slice_view(volume, markups, tmp_path / "view.png", app_logic=headless.app_logic,
                                    centre_ras=centre_ras, size=(400, 400), field_of_view_mm=200.0)
    pixels = render.read_png(view.path)
    assert pixels.shape[:2] == (400, 400)

    # The view is centred on the nodule: its pixel is the middle of the picture.
    column, row = view.pixel_of(centre_ras)
    assert abs(column - 200) < 2 and abs(row - 200) < 2
    assert set(view.points_px) == {"n1 · 87% a", "n2 · 8% a"}
    for rgb, (col, rw), other in ((results.MALIGNANT_RGB, view.pixel_of(centre_ras), results.BENIGN_RGB),
                                  (results.BENIGN_RGB, view.pixel_of(benign_ras), results.MALIGNANT_RGB)):
        near = (slice(int(rw) - 8, int(rw) + 9), slice(int(col) - 8, int(col) + 9))
        mask = _colour_mask(pixels, rgb)
        assert mask[near].sum() >= 10, f"no {rgb} glyph at ({col:.0f}, {rw:.0f})"
        assert _colour_mask(pixels, other)[near].sum() == 0
        rows_px, cols_px = np.nonzero(mask[near])
        assert abs(cols_px.mean() - 8) < 3 and abs(rows_px.mean() - 8) < 3  # glyph centred on the point
    # The volume is drawn in the lung window: the solid nodule around the point is bright,
    # the air below the table is black.
    ring = pixels[int(row) - 20:int(row) + 21, int(column) - 20:int(column) + 21, :3].astype(float)
    assert np.median(ring) > 150 and pixels[395, 5, :3].max() < 30
    # Labels are drawn beside the glyph, in the glyph's colour (more coloured pixels than the glyph alone).
    assert _colour_mask(pixels, results.MALIGNANT_RGB).sum() > _colour_mask(pixels, results.MALIGNANT_RGB)[near].sum()
