"""Patch geometry: one trilinear interpolation from the original grid, in LPS mm, for every
view set, direction matrix and spacing; LPS/RAS conversions; real LIDC nodules."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import rotation

from MedLoRALib.annotations import load_nodules
from MedLoRALib.ctio import load_ct
from MedLoRALib.errors import PatchError
from MedLoRALib.geometry import Geometry, lps_to_ras, ras_to_lps, to_lps
from MedLoRALib.image import AIR_HU, CTImage
from MedLoRALib.patches import PLANE_AXES, PatchSpec, cube_geometry, extract_patches, sample_points_lps

OBLIQUE = rotation("z", 25) @ rotation("x", -12) @ rotation("y", 8)
GEOMETRIES = {
    "axis-aligned": Geometry((72, 72, 48), (0.8, 0.8, 0.8), (-28.0, -30.0, -18.0)),
    "anisotropic": Geometry((90, 80, 24), (0.6, 0.7, 2.5), (-27.0, -28.0, -30.0)),
    "oblique": Geometry((80, 80, 40), (0.7, 0.75, 1.4), (-10.0, -45.0, -20.0), OBLIQUE),
    "flipped": Geometry((80, 80, 40), (0.7, 0.7, 1.25), (28.0, 28.0, 25.0), np.diag([-1.0, -1.0, -1.0])),
}
VIEW_SETS = ("axial", "ortho3", "multiview9", "cube")


def voxel_centres_lps(g: Geometry) -> np.ndarray:
    """LPS position of every voxel, array order [k, j, i, xyz]."""
    k, j, i = np.indices(tuple(reversed(g.size)))
    return g.ijk_to_lps(np.stack([i, j, k], axis=-1).astype(float))


def blob_ct(g: Geometry, centre_lps, sigma_mm=(2.0, 2.0, 2.0), peak_hu: float = 1400.0) -> CTImage:
    """Air with a Gaussian blob (axis-aligned in LPS) at ``centre_lps``."""
    rel = (voxel_centres_lps(g) - np.asarray(centre_lps)) / np.asarray(sigma_mm)
    return CTImage((-1000.0 + peak_hu * np.exp(-0.5 * (rel ** 2).sum(-1))).astype(np.float32), g)


def linear_ct(g: Geometry) -> tuple[CTImage, np.ndarray, float]:
    """HU = a·p + b: trilinear interpolation reproduces it exactly anywhere inside."""
    a, b = np.array([3.0, -2.0, 1.5]), 10.0
    return CTImage((voxel_centres_lps(g) @ a + b).astype(np.float64), g), a, b


RAW = dict(window_hu=None, normalisation="none")


def weighted_centroid(values: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid (array index order) of HU values above air."""
    w = np.clip(values + 1000.0, 0, None)
    grids = np.indices(values.shape)
    return np.array([(g * w).sum() / w.sum() for g in grids])


def centroid_offsets_mm(patch: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """Centroid minus patch centre in mm: (planes, 2) as (row, column), or (3,) as (z, y, x) for cube."""
    middle = (spec.pixels - 1) / 2
    if spec.views == "cube":
        return (weighted_centroid(patch) - middle) * spec.pixel_mm
    return np.array([(weighted_centroid(plane) - middle) * spec.pixel_mm for plane in patch])


# --- a bright blob comes out at the centre ----------------------------------------------------
@pytest.mark.parametrize("views", VIEW_SETS)
@pytest.mark.parametrize("name", GEOMETRIES)
def test_blob_at_known_world_position_is_at_patch_centre(name, views):
    g = GEOMETRIES[name]
    lo, hi = g.extent_lps
    centre = (lo + hi) / 2 + np.array([0.37, -0.41, 0.29])  # off the voxel grid on purpose
    ct = blob_ct(g, centre)
    spec = PatchSpec(views=views, fov_mm=24.0, pixels=33, **RAW)
    patch = extract_patches(ct, centre[None], spec)[0]
    assert patch.shape == spec.shape
    offsets = centroid_offsets_mm(patch, spec)
    assert np.abs(offsets).max() < 0.5 * min(g.spacing), offsets
    assert patch.max() > 0  # the blob's peak is there (1400 HU above air, smoothed by sampling)


def test_even_pixel_count_centres_between_pixels():
    g = GEOMETRIES["anisotropic"]
    centre = np.mean(g.extent_lps, axis=0)
    spec = PatchSpec(views="ortho3", fov_mm=20.0, pixels=32, **RAW)
    patch = extract_patches(blob_ct(g, centre), centre[None], spec)[0]
    assert np.abs(centroid_offsets_mm(patch, spec)).max() < 0.5 * min(g.spacing)
    np.testing.assert_allclose(patch[:, 15, 15], patch[:, 16, 16], atol=2.0)  # symmetric about 15.5


def spread_mm(plane: np.ndarray, spec: PatchSpec) -> tuple[float, float]:
    """Intensity-weighted standard deviation along rows and along columns, in mm."""
    w = np.clip(plane + 1000.0, 0, None)
    rows, cols = np.indices(plane.shape)
    mean_r, mean_c = (rows * w).sum() / w.sum(), (cols * w).sum() / w.sum()
    return (float(np.sqrt(((rows - mean_r) ** 2 * w).sum() / w.sum())) * spec.pixel_mm,
            float(np.sqrt(((cols - mean_c) ** 2 * w).sum() / w.sum())) * spec.pixel_mm)


# --- plane orientation as documented ---------------------------------------------------------
def offset_blob_centroids(direction_offset_lps, views="multiview9", name="oblique"):
    g = GEOMETRIES[name]
    centre = np.mean(g.extent_lps, axis=0)
    ct = blob_ct(g, centre + np.asarray(direction_offset_lps, dtype=float), sigma_mm=(1.5, 1.5, 1.5))
    spec = PatchSpec(views=views, fov_mm=30.0, pixels=61, **RAW)
    return extract_patches(ct, centre[None], spec)[0], spec


@pytest.mark.parametrize("name", ["axis-aligned", "oblique", "flipped"])
def test_planes_are_oriented_radiologically(name):
    """Axial: columns run to patient Left (+x LPS), rows to Posterior (+y). Coronal and
    sagittal: Superior (+z) is at the top (smaller row)."""
    plane = {p: i for i, p in enumerate(PLANE_AXES)}
    left, _ = offset_blob_centroids((6.0, 0.0, 0.0), name=name)
    posterior, _ = offset_blob_centroids((0.0, 6.0, 0.0), name=name)
    superior, spec = offset_blob_centroids((0.0, 0.0, 6.0), name=name)
    row_col = lambda patch, p: centroid_offsets_mm(patch, spec)[plane[p]]  # noqa: E731
    assert row_col(left, "axial")[1] == pytest.approx(6.0, abs=0.3)        # Left → right-hand columns
    assert row_col(left, "coronal")[1] == pytest.approx(6.0, abs=0.3)
    assert row_col(posterior, "axial")[0] == pytest.approx(6.0, abs=0.3)   # Posterior → lower rows
    assert row_col(posterior, "sagittal")[1] == pytest.approx(6.0, abs=0.3)
    assert row_col(superior, "coronal")[0] == pytest.approx(-6.0, abs=0.3)  # Superior → upper rows
    assert row_col(superior, "sagittal")[0] == pytest.approx(-6.0, abs=0.3)


def test_elongated_blob_along_x_lies_along_axial_columns():
    g = GEOMETRIES["anisotropic"]
    centre = np.mean(g.extent_lps, axis=0)
    ct = blob_ct(g, centre, sigma_mm=(6.0, 1.2, 1.2))
    spec = PatchSpec(views="ortho3", fov_mm=40.0, pixels=81, **RAW)
    axial, coronal, sagittal = extract_patches(ct, centre[None], spec)[0]
    (axial_rows, axial_cols), (cor_rows, cor_cols), (sag_rows, sag_cols) = (
        spread_mm(p, spec) for p in (axial, coronal, sagittal))
    # σ 6 mm along x shows along the columns; across it σ 1.2 mm, widened a little by
    # trilinear sampling of the 2.5 mm slices along z (coronal and sagittal rows)
    assert axial_cols == pytest.approx(6.0, rel=0.1) and axial_rows < 1.6
    assert cor_cols == pytest.approx(6.0, rel=0.1) and cor_rows < 2.0
    assert sag_cols < 1.6 and sag_rows < 2.0  # seen end-on


def test_every_plane_shows_an_offset_where_its_axes_say():
    offset = np.array([3.0, -4.0, 5.0])
    patch, spec = offset_blob_centroids(offset)
    found = centroid_offsets_mm(patch, spec)
    for index, (u, v) in enumerate(PLANE_AXES.values()):
        u, v = np.asarray(u), np.asarray(v)
        in_plane = offset @ u, offset @ v
        out_of_plane = np.linalg.norm(offset - in_plane[0] * u - in_plane[1] * v)
        if out_of_plane < 1.0:  # only planes that pass through the blob see it centred
            np.testing.assert_allclose(found[index], (in_plane[1], in_plane[0]), atol=0.3)


# --- one interpolation, exact geometry -------------------------------------------------------
@pytest.mark.parametrize("views", VIEW_SETS)
@pytest.mark.parametrize("name", GEOMETRIES)
def test_values_are_the_ct_at_the_sample_positions(name, views):
    """For a linear HU field trilinear interpolation is exact, so each patch value must equal
    the field at that sample's LPS position: checks spacing, origin and direction handling."""
    g = GEOMETRIES[name]
    ct, a, b = linear_ct(g)
    centre = np.mean(g.extent_lps, axis=0) + np.array([1.1, -0.7, 0.4])
    rot = rotation("y", 17) @ rotation("z", -40)
    spec = PatchSpec(views=views, fov_mm=16.0, pixels=9, **RAW)
    patch = extract_patches(ct, centre[None], spec, rotations=rot)[0]
    points = sample_points_lps(centre[None], spec, rot)[0]
    np.testing.assert_allclose(patch, points @ a + b, atol=2e-3)


def test_rotated_frame_moves_an_off_centre_feature_where_the_rotation_says():
    g = GEOMETRIES["axis-aligned"]
    centre = np.mean(g.extent_lps, axis=0)
    ct = blob_ct(g, centre + np.array([8.0, 0.0, 0.0]), sigma_mm=(1.5, 1.5, 1.5))
    spec = PatchSpec(views="axial", fov_mm=30.0, pixels=61, **RAW)
    quarter_turn = rotation("z", 90)  # frame column axis (local x) now points to world +y
    (row_mm, col_mm), = centroid_offsets_mm(extract_patches(ct, centre[None], spec, quarter_turn)[0], spec)
    assert (row_mm, col_mm) == pytest.approx((-8.0, 0.0), abs=0.3)  # local offset Rᵀd = (0, -8, 0)
    rot = rotation("x", 30) @ rotation("z", 50)
    cube_spec = PatchSpec(views="cube", fov_mm=30.0, pixels=31, **RAW)
    cube = extract_patches(ct, centre[None], cube_spec, rot)[0]
    z, y, x = centroid_offsets_mm(cube, cube_spec)
    np.testing.assert_allclose((x, y, z), rot.T @ np.array([8.0, 0.0, 0.0]), atol=0.3)


def test_per_nodule_rotations_and_bad_rotation_shapes():
    g = GEOMETRIES["axis-aligned"]
    ct, a, b = linear_ct(g)
    centres = np.mean(g.extent_lps, axis=0) + np.array([[0.0, 0.0, 0.0], [2.0, 1.0, -1.0]])
    rots = np.stack([rotation("z", 10), rotation("x", 70)])
    spec = PatchSpec(views="ortho3", fov_mm=10.0, pixels=5, **RAW)
    patches = extract_patches(ct, centres, spec, rots)
    for n in range(2):
        np.testing.assert_allclose(patches[n], sample_points_lps(centres[n:n + 1], spec, rots[n])[0] @ a + b, atol=2e-3)
    with pytest.raises(PatchError, match=r"rotations must be \(3, 3\) or \(2, 3, 3\)"):
        extract_patches(ct, centres, spec, np.stack([np.eye(3)] * 3))


# --- outside and near the edge ---------------------------------------------------------------
def test_points_outside_the_volume_are_named():
    g = GEOMETRIES["oblique"]
    ct, _, _ = linear_ct(g)
    inside = np.mean(g.extent_lps, axis=0)
    with pytest.raises(PatchError) as info:
        extract_patches(ct, np.array([inside, [400.0, 1.0, 2.0], inside, [-1.0, -300.5, 9.0]]), PatchSpec())
    message = str(info.value)
    assert "2 nodule centre(s)" in message and "#1 at LPS (400.0, 1.0, 2.0)" in message
    assert "#3 at LPS (-1.0, -300.5, 9.0)" in message and "RAS" in message


def test_near_edge_patch_reads_air_outside():
    g = GEOMETRIES["axis-aligned"]
    ct = CTImage(np.full(tuple(reversed(g.size)), 50.0, dtype=np.float32), g)
    corner = g.ijk_to_lps((0, 0, 0))
    spec = PatchSpec(views="axial", fov_mm=20.0, pixels=21, **RAW)
    (plane,) = extract_patches(ct, corner[None], spec)[0]
    # rows/columns before the corner (−x, −y) are outside: exactly air
    assert np.all(plane[:9, :] == AIR_HU) and np.all(plane[:, :9] == AIR_HU)
    assert np.all(plane[11:, 11:] == 50.0)
    windowed = extract_patches(ct, corner[None], PatchSpec(views="axial", fov_mm=20.0, pixels=21))[0, 0]
    assert windowed[0, 0] == 0.0  # air is the bottom of the default window


@pytest.mark.parametrize("centres", [np.array([1.0, 2.0]), np.array([[np.nan, 0.0, 0.0]])])
def test_malformed_centres(centres):
    g = GEOMETRIES["axis-aligned"]
    with pytest.raises(PatchError):
        extract_patches(CTImage(np.zeros(tuple(reversed(g.size)), np.float32), g), centres)


# --- cube geometry -----------------------------------------------------------------------------
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("pixels", [17, 16])
def test_cube_geometry_resamples_back_onto_the_same_world_positions(rotate, pixels):
    """Saved with cube_geometry, the cube's voxel (i, j, k) sits at the world point it was
    sampled from; SimpleITK resampling the CT onto that grid gives the same values."""
    g = GEOMETRIES["oblique"]
    ct = blob_ct(g, np.mean(g.extent_lps, axis=0) + 2.0, sigma_mm=(3.0, 2.0, 4.0))
    centre = np.mean(g.extent_lps, axis=0) + np.array([0.6, -0.3, 0.9])
    rot = rotation("z", 33) @ rotation("y", -21) if rotate else None
    spec = PatchSpec(views="cube", fov_mm=20.0, pixels=pixels, **RAW)
    cube = extract_patches(ct, centre[None], spec, rot)[0]
    cg = cube_geometry(centre, spec, rot)
    k, j, i = np.indices(cube.shape)
    np.testing.assert_allclose(cg.ijk_to_lps(np.stack([i, j, k], -1).astype(float)),
                               sample_points_lps(centre[None], spec, rot)[0], atol=1e-9)
    np.testing.assert_allclose(cg.ijk_to_lps(np.full(3, (pixels - 1) / 2)), centre, atol=1e-9)
    reference = sitk.Image(*cg.size, sitk.sitkFloat32)
    cg.apply_to_sitk(reference)
    resampled = sitk.Resample(ct.to_sitk(), reference, sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(resampled), cube, atol=0.05)


# --- LPS / RAS ---------------------------------------------------------------------------------
def test_lps_ras_conversions_both_ways():
    p_lps = np.array([[10.0, -20.0, 30.0], [-1.5, 2.5, -3.5]])
    p_ras = lps_to_ras(p_lps)
    np.testing.assert_array_equal(p_ras, [[-10.0, 20.0, 30.0], [1.5, -2.5, -3.5]])
    np.testing.assert_array_equal(ras_to_lps(p_ras), p_lps)
    np.testing.assert_array_equal(to_lps(p_ras, " ras "), p_lps)
    np.testing.assert_array_equal(to_lps(p_lps, "LPS"), p_lps)
    with pytest.raises(ValueError, match="unknown coordinate system"):
        to_lps(p_lps, "IJK")


@pytest.mark.parametrize("name", GEOMETRIES)
def test_ras_from_ijk_round_trip_and_agrees_with_simpleitk(name):
    g = GEOMETRIES[name]
    back = Geometry.from_ras_from_ijk(g.ras_from_ijk, g.size)
    np.testing.assert_allclose(back.spacing, g.spacing)
    np.testing.assert_allclose(back.origin_lps, g.origin_lps)
    np.testing.assert_allclose(back.direction, g.direction, atol=1e-12)
    ijk = np.array([[0.0, 0.0, 0.0], [3.5, 7.25, 2.0], [g.size[0] - 1, 1.0, g.size[2] - 1]])
    ras = (g.ras_from_ijk @ np.c_[ijk, np.ones(3)].T).T[:, :3]
    np.testing.assert_allclose(ras, lps_to_ras(g.ijk_to_lps(ijk)), atol=1e-9)
    np.testing.assert_allclose(g.lps_to_ijk(g.ijk_to_lps(ijk)), ijk, atol=1e-9)
    image = sitk.Image(*g.size, sitk.sitkInt16)
    g.apply_to_sitk(image)
    for point in ijk:
        np.testing.assert_allclose(image.TransformContinuousIndexToPhysicalPoint(point.tolist()),
                                   g.ijk_to_lps(point), atol=1e-6)
    assert Geometry.from_sitk(image).size == g.size


# --- real LIDC nodules -------------------------------------------------------------------------
def montage(patch: np.ndarray) -> np.ndarray:
    """Nine (or three) planes of a [0, 1] patch tiled into one uint8 image, 3 per row."""
    planes, p, _ = patch.shape
    rows = -(-planes // 3)
    tiles = np.zeros((rows * p, min(planes, 3) * p), dtype=np.uint8)
    for n, plane in enumerate(patch):
        r, c = divmod(n, 3)
        tiles[r * p:(r + 1) * p, c * p:(c + 1) * p] = np.round(plane * 255)
    return tiles


@pytest.mark.parametrize("case", ["lidc_0001", "lidc_0003"])
def test_lidc_consensus_centres_land_on_nodules(case, request, tmp_path):
    from PIL import Image

    folder = request.getfixturevalue(case)
    ct = load_ct(folder)
    nodules = load_nodules(next(folder.glob("*.xml")), image=ct)
    consensus = [n for n in nodules if n.reader_count >= 2]
    assert consensus
    centres = np.array([n.centre_lps for n in consensus])
    raw = extract_patches(ct, centres, PatchSpec(views="multiview9", fov_mm=50.0, pixels=65, **RAW))
    t = (np.arange(65) - 32) * 50.0 / 65
    radius = np.hypot(*np.meshgrid(t, t))
    for nodule, patch in zip(consensus, raw):
        assert np.all(patch[:, 32, 32] > -400), (nodule.nodule_id, patch[:, 32, 32])
        core = patch[:, radius < 3].mean()
        ring = np.median(patch[:, radius > 20])
        assert core - ring > 400, (nodule.nodule_id, core, ring)
    shown = extract_patches(ct, centres, PatchSpec(views="multiview9", fov_mm=50.0, pixels=64))
    for nodule, patch in zip(consensus, shown):
        path = tmp_path / f"{nodule.nodule_id.replace('/', '_')}.png"
        Image.fromarray(montage(patch)).save(path)
        with Image.open(path) as png:
            assert png.size == (192, 192) and png.mode == "L"
            tiles = np.asarray(png).reshape(3, 64, 3, 64).transpose(0, 2, 1, 3).reshape(9, 64, 64)
        np.testing.assert_array_equal(tiles, np.round(patch * 255))  # the montage is the patch
        ring = np.hypot(*np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5)) * 50.0 / 64 > 20
        assert tiles[:, 28:36, 28:36].mean() > np.median(tiles[:, ring]) + 60  # bright centre, dark lung
