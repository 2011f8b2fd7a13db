"""Crops from the scene (slicer-core, no Qt): thumbnail, cube volume node, export as ``medlora crop`` writes."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from MedLoRALib.cli import main as medlora
from MedLoRALib.crops import montage
from MedLoRALib.ctio import save_volume
from MedLoRALib.errors import MedLoRAError
from MedLoRALib.patches import PatchSpec, extract_patches
from MedLoRALib.slicer import crops, mrml
from MedLoRALib.synthetic import PhantomConfig, make_phantom

pytest.importorskip("slicer")

MODULE_DIR = Path(__file__).resolve().parents[1] / "MedLoRA"
SPEC = PatchSpec(views="ortho3", fov_mm=40.0, pixels=32)


def _rotation() -> np.ndarray:
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def oblique_case():
    """A phantom CT on an oblique grid, with its nodules."""
    config = PhantomConfig(size=(128, 112, 48), n_nodules=3, direction=tuple(_rotation().ravel()))
    return make_phantom(config, seed=3, case_id="oblique")


@pytest.fixture()
def scene(oblique_case):
    image, nodules = oblique_case
    headless = mrml.create_headless_scene()
    volume = mrml.add_volume_node(headless.scene, image, name="oblique")
    markups = mrml.add_markups_node(headless.scene, nodules, name="oblique nodules")
    return headless, volume, markups


def test_thumbnail_shows_the_adapters_views_of_one_nodule(scene, oblique_case):
    image, nodules = oblique_case
    _, volume, markups = scene
    point = mrml.markups_to_points(markups, "oblique")[1]
    tile = crops.thumbnail(volume, point, SPEC)
    expected = montage(extract_patches(image, np.array([nodules[1].centre_lps]), crops.display_spec(SPEC))[0])
    assert tile.dtype == np.uint8 and tile.shape == (32, 96)
    assert np.abs(tile.astype(int) - expected).max() <= 1
    nine = crops.thumbnail(volume, point, PatchSpec(views="multiview9", fov_mm=40.0, pixels=32))
    assert nine.shape == (96, 96)
    cube = crops.thumbnail(volume, point, PatchSpec(views="cube", fov_mm=40.0, pixels=32, window_hu=None,
                                                    normalisation="none"))
    assert cube.shape == (32, 96) and cube.max() > 100  # windowed for display even for a raw-HU spec
    markups.AddControlPointWorld(900.0, 900.0, 900.0, "far")
    far = mrml.markups_to_points(markups, "oblique")[-1]
    with pytest.raises(MedLoRAError, match="outside volume 'oblique'"):
        crops.thumbnail(volume, far, SPEC)


def test_cube_volume_node_lies_exactly_where_it_was_cut(scene, oblique_case):
    image, nodules = oblique_case
    headless, volume, markups = scene
    point = mrml.markups_to_points(markups, "oblique")[0]
    cube_node = crops.cube_to_volume(headless.scene, volume, point, SPEC)

    assert cube_node.GetName() == f"{point.name} cube"
    cube = mrml.volume_to_ct_image(cube_node)
    assert cube.voxels_hu.shape == (32, 32, 32)
    # The cube's middle (between voxels 15 and 16) is the point, in world RAS.
    middle = (32 - 1) / 2
    ras = mrml.volume_world_ras_from_ijk(cube_node) @ np.array([middle, middle, middle, 1.0])
    np.testing.assert_allclose(ras[:3], point.position_ras, atol=1e-6)
    np.testing.assert_allclose(cube.geometry.spacing, (40.0 / 32,) * 3)
    # Voxels are HU sampled from the original grid, the same as MedLoRALib's cube patch.
    hu = PatchSpec(views="cube", fov_mm=40.0, pixels=32, window_hu=None, normalisation="none")
    expected = extract_patches(image, np.array([nodules[0].centre_lps]), hu)[0]
    np.testing.assert_allclose(cube.voxels_hu, expected, atol=1e-3)
    assert cube.voxels_hu.min() < -700  # lung around the nodule, in HU (not a [0, 1] patch)


def test_export_writes_what_medlora_crop_writes(scene, oblique_case, tmp_path):
    image, nodules = oblique_case
    _, volume, markups = scene
    markups.AddControlPointWorld(900.0, 900.0, 900.0, "far")
    job = crops.crop_job_for(SPEC)
    export = crops.export_crops([(volume, markups)], tmp_path / "slicer", job)
    assert export.written == 3 and export.skipped == ["oblique: 'far' lies outside the volume"]

    # The same CT and points through the command line.
    save_volume(image, tmp_path / "oblique.nrrd")
    with open(tmp_path / "points.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", "z", "coordinate_system", "nodule_id"])
        for nodule in nodules:
            writer.writerow([*nodule.centre_lps, "LPS", nodule.nodule_id])
    assert medlora(["crop", "--volume", str(tmp_path / "oblique.nrrd"), "--points", str(tmp_path / "points.csv"),
                    "--out", str(tmp_path / "cli"), "--views", "ortho3", "--fov-mm", "40", "--pixels", "32"]) == 0

    def index(folder):
        with open(folder / "index.csv", newline="") as handle:
            return list(csv.DictReader(handle))

    ours, theirs = index(tmp_path / "slicer"), index(tmp_path / "cli")
    assert list(ours[0]) == list(theirs[0])  # same columns
    for mine, cli in zip(ours, theirs, strict=True):
        assert mine["file"] == cli["file"] and mine["nodule_id"] == cli["nodule_id"]
        assert mine["study"] == "oblique" and mine["case_id"] == "oblique"
        for axis in ("x_lps", "y_lps", "z_lps"):
            assert float(mine[axis]) == pytest.approx(float(cli[axis]), abs=1e-3)
        from PIL import Image

        a = np.asarray(Image.open(tmp_path / "slicer" / mine["file"]), dtype=int)
        b = np.asarray(Image.open(tmp_path / "cli" / cli["file"]), dtype=int)
        assert a.shape == b.shape == (32, 96) and np.abs(a - b).max() <= 1


@pytest.mark.slow  # importing torch/timm/peft for a real adapter takes ~10 s in a fresh process
def test_module_logic_crops_with_the_adapters_patch_spec(scene, tmp_path, tiny_adapter):
    import torch

    from MedLoRALib.adapters.store import AdapterStore

    torch.set_num_threads(1)
    sys.path.insert(0, str(MODULE_DIR))
    try:
        import MedLoRA
    finally:
        sys.path.remove(str(MODULE_DIR))
    headless, volume, markups = scene
    spec = PatchSpec(views="multiview9", fov_mm=30.0, pixels=16)
    store = AdapterStore(tmp_path / "store")
    folder = tiny_adapter("nine", spec, scale=0.0, manifest={"threshold": 0.4, "label_names": ["follow-up", "biopsy"]})
    logic = MedLoRA.MedLoRALogic(scene=headless.scene, store=store, workDir=str(tmp_path / "work")).moduleLogic
    assert logic.importAdapter(str(folder / "manifest.json")) == "nine"  # the file dialog picks the manifest
    assert logic.adapterNames() == ["nine"]
    info = logic.adapterInfo("nine")
    assert "RANDOM INIT" in info and "multiview9 patches of 30 mm at 16 px" in info
    assert "biopsy at probability ≥ 0.40, else follow-up" in info

    markups.GetDisplayNode().SetActiveControlPoint(-1)  # as it is once a button in the module panel is clicked
    point = logic.selectedPoint(volume, markups, pointIndex=2)
    assert point.index == 2
    png = logic.cropPreview(volume, point, "nine", tmp_path / "thumb.png")
    from PIL import Image

    assert Image.open(png).size == (48, 48)  # nine 16-px views, three per row
    cube = logic.showCube(volume, point, "nine")
    assert cube.GetImageData().GetDimensions() == (16, 16, 16)
    (tmp_path / "chosen").mkdir()
    (tmp_path / "chosen" / "notes.txt").write_text("the user's")  # a dialog's folder usually holds other files
    export = logic.exportCrops(tmp_path / "chosen", "nine", volume, markups)  # the selected, unlinked pair
    assert export.written == 3 and len(list((tmp_path / "chosen" / "medlora-crops").glob("*.png"))) == 3
    again = logic.exportCrops(tmp_path / "chosen", "nine", volume, markups)  # never over the first export
    assert again.index.parent.name == "medlora-crops-2" and export.index.is_file()
    with pytest.raises(MedLoRAError, match="choose an adapter"):
        logic.showCube(volume, point, "")
    assert logic.session.engine.starts == 0  # cropping never needs the engine
