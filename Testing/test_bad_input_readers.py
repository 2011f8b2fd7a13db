"""Bad input to the readers (issue 11): files another tool, a text editor or a crash wrote.

Each case must end in a ``MedLoRAError`` whose message says what was wrong and where (file,
line, column, point), never a traceback from inside a library and never a silently wrong
result; through the CLI: exit 2, one line, and the inputs unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import tree_digest
from test_annotations import blank_ct, lidc_xml, square

from MedLoRALib.annotations import load_nodules
from MedLoRALib.annotations.markups import load_markups
from MedLoRALib.annotations.points_csv import load_points_csv
from MedLoRALib.cli import main
from MedLoRALib.ctio import save_volume
from MedLoRALib.errors import AnnotationError, DatasetError
from MedLoRALib.geometry import Geometry
from MedLoRALib.image import CTImage
from MedLoRALib.training.manifest import read_rows


def fiducial(position, **point) -> str:
    """A one-point Slicer markups file whose position is written verbatim (any JSON text)."""
    extra = "".join(f', "{k}": {json.dumps(v)}' for k, v in point.items())
    point_text = f'{{"id": "1", "label": "N-1", "position": {position}{extra}}}'
    return ('{"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/'
            'Resources/Schema/markups-schema-v1.0.3.json#", "markups": [{"type": "Fiducial", "name": "N", '
            f'"coordinateSystem": "LPS", "controlPoints": [{point_text}]}}]}}')


# --- Slicer markups JSON ----------------------------------------------------------------------------


@pytest.mark.parametrize("position, words", [
    ('["12.5", 3, 4]', "value 1 of 3 is '12.5', not a number"),      # a string coordinate (the case)
    ('["left", 3, 4]', "value 1 of 3 is 'left', not a number"),
    ("[null, 3, 4]", "value 1 of 3 is None, not a number"),
    ("[1, 2]", "expected a list of 3 numbers, got 2 values"),
    ("[1, 2, 3, 4]", "expected a list of 3 numbers, got 4 values"),
    ("[1, NaN, 3]", "value 2 of 3 is nan, not a finite number"),      # Python's json accepts NaN/Infinity
    ("[1, 2, Infinity]", "value 3 of 3 is inf, not a finite number"),
    ("[1e999, 2, 3]", "value 1 of 3 is inf, not a finite number"),    # overflows to inf
    ("[" + "9" * 400 + ", 2, 3]", "not a finite number"),              # an int beyond float range
    ("[true, 2, 3]", "value 1 of 3 is True, not a number"),            # bool is an int in Python
    ("[[1], [2], [3]]", "value 1 of 3 is [1], not a number"),
    ('"1,2,3"', "expected a list of 3 numbers, got '1,2,3'"),
    ('{"x": 1}', "expected a list of 3 numbers"),
    ("null", "expected a list of 3 numbers, got None"),
])
def test_markups_bad_positions_name_the_point_and_value(tmp_path, position, words):
    path = tmp_path / "nodules.mrk.json"
    path.write_text(fiducial(position), encoding="utf-8")
    before = tree_digest(path)
    with pytest.raises(AnnotationError) as info:
        load_markups(path)
    text = str(info.value)
    assert words in text, text
    assert "nodules.mrk.json, markup 1, control point 1 ('N-1') position" in text
    assert "place the point again in Slicer" in text  # what to do
    assert len(text) < 400 and tree_digest(path) == before


@pytest.mark.parametrize("text, words", [
    ('{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, 2', "not valid JSON"),  # truncated
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),                         # RecursionError inside json
    ('{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [' + "1" * 5000 + ", 1, 1]}]}]}",
     "cannot be read"),                                                             # int digit limit (ValueError)
    ("[1, 2, 3]", "no 'markups' list"),
    ('{"markups": {"type": "Fiducial"}}', "no 'markups' list"),
    ('{"markups": ["Fiducial"]}', "markup 1: expected an object, got 'Fiducial'"),
    ('{"markups": [{"type": "Fiducial", "controlPoints": 5}]}', "controlPoints must be a list"),
    ('{"markups": [{"type": "Fiducial", "controlPoints": [7]}]}', "control point 1: expected an object, got 7"),
    ('{"markups": [{"type": "Fiducial", "coordinateSystem": "IJK", "controlPoints": []}]}',
     "coordinateSystem must be 'LPS' or 'RAS'"),
    ('{"markups": [{"type": "Fiducial", "coordinateUnits": "um", "controlPoints": []}]}', "only millimetres"),
    ('{"markups": [{"type": "ROI", "center": [1, 2, 3], "size": [4, -5, 6]}]}', "negative edge"),
    ('{"markups": [{"type": "ROI", "center": [1, 2, 3], "size": [4, 5, 6], "orientation": [2,0,0,0,1,0,0,0,1]}]}',
     "is not a rotation"),
    ('{"markups": [{"type": "ROI", "center": [1, 2, 3], "orientation": [1,0,0,0,1,0,0,0,"a"]}]}',
     "orientation: value 9 of 9 is 'a'"),
    ('{"markups": [{"type": "Curve", "controlPoints": []}]}', "markup types found: Curve"),
])
def test_markups_malformed_files(tmp_path, text, words):
    path = tmp_path / "m.mrk.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AnnotationError, match=None) as info:
        load_markups(path)
    assert words in str(info.value) and "m.mrk.json" in str(info.value), str(info.value)


@pytest.mark.parametrize("point, words", [
    ({"positionStatus": "lost"}, "positionStatus 'lost' is not one of defined, preview, undefined"),
    ({"description": "malignant; malignancy=9"}, "malignancy=9; ratings are 1–5"),
    ({"description": "diameter_mm=0"}, "diameter_mm=0; it must be a positive"),
])
def test_markups_bad_point_fields(tmp_path, point, words):
    path = tmp_path / "m.mrk.json"
    path.write_text(fiducial("[1, 2, 3]", **point), encoding="utf-8")
    with pytest.raises(AnnotationError, match=None) as info:
        load_markups(path)
    assert words in str(info.value), str(info.value)


def test_markups_description_that_only_looks_like_a_value_is_free_text(tmp_path):
    path = tmp_path / "m.mrk.json"
    path.write_text(fiducial("[1, 2, 3]", description="malignancy=e, see notes; diameter_mm=--"), encoding="utf-8")
    (nodule,) = load_markups(path)
    assert nodule.malignancy is None and nodule.diameter_mm is None and nodule.centre_lps == (1.0, 2.0, 3.0)


def test_markups_unplaced_points_are_skipped_with_a_warning(tmp_path, caplog):
    document = json.loads(fiducial("[1, 2, 3]"))
    document["markups"][0]["controlPoints"] += [
        {"id": "2", "label": "N-2", "position": [0, 0, 0], "positionStatus": "undefined"},
        {"id": "3", "label": "N-3", "position": [5, 5, 5], "positionStatus": "preview"}]
    path = tmp_path / "m.mrk.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        nodules = load_markups(path)
    assert [n.nodule_id for n in nodules] == ["N-1"]
    assert "skipped 2 control point(s) that were never placed" in caplog.text and "2 (undefined), 3 (preview)" in \
        caplog.text


# --- points CSV ---------------------------------------------------------------------------------------


HEADER = "nodule_id,x,y,z,coordinate_system,label"


@pytest.mark.parametrize("rows, words", [
    (["a,1,2,3,LPS,1", "b,1,2"], "line 3: 3 cell(s) but the header has 6 columns, so it has no value for z, "
                                 "coordinate_system, label"),
    (["a,1,2,3,LPS,1,extra"], "line 2: 7 cells but the header has 6 columns"),
    (["a,1,two,3,LPS,1"], "line 2: column 'y' should be a number, got 'two'"),
    (["a,1,2,1e400,LPS,1"], "line 2: column 'z' is not finite"),
    (["a,1,2,nan,LPS,1"], "line 2: column 'z' is not finite"),
    (["a,1,,3,LPS,1"], "line 2: column 'y' is empty"),
    (["a,1,2,3,IJK,1"], "line 2: coordinate_system must be LPS or RAS, got 'IJK'"),
    (["a,1,2,3,LPS,maybe"], "line 2: label must be 0/1"),
    (['a,1,2,"3,LPS,1', "b,1,2,3,LPS,1"], "(an unclosed quote? the row runs on to line 3)"),
    (['a,1,2,"' + "3" * 200_000 + '",LPS,1'], "field larger than field limit"),
])
def test_points_csv_bad_rows_name_line_and_column(tmp_path, rows, words):
    path = tmp_path / "points.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    with pytest.raises(AnnotationError) as info:
        load_points_csv(path)
    assert words in str(info.value) and "points.csv" in str(info.value), str(info.value)


def test_points_csv_spreadsheet_padding_is_not_a_missing_column(tmp_path):
    """Trailing empty cells and unnamed trailing header columns are what spreadsheets write."""
    path = tmp_path / "points.csv"
    path.write_text(f"{HEADER},,\na,1,2,3,LPS,1\nb,4,5,6,RAS,0,,\n", encoding="utf-8")
    assert [n.centre_lps for n in load_points_csv(path)] == [(1.0, 2.0, 3.0), (-4.0, -5.0, 6.0)]


@pytest.mark.parametrize("data, words", [
    (HEADER.encode("utf-16"), "UTF-16 byte-order mark"),
    (b"nodule_id,x,y,z,coordinate_system\na,1,2,3,LPS\xff\n", "is not UTF-8 text (byte"),
])
def test_points_csv_other_encodings(tmp_path, data, words):
    path = tmp_path / "points.csv"
    path.write_bytes(data)
    with pytest.raises(AnnotationError, match=None) as info:
        load_points_csv(path)
    assert words in str(info.value)


@pytest.mark.parametrize("text", ['"' + "a" * 200_000 + "\n", "a" * 200_000 + ",x\n1,2\n"])
def test_format_detection_on_a_first_line_beyond_the_csv_field_limit(tmp_path, text):
    path = tmp_path / "huge.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AnnotationError, match="cannot tell the format of .*huge.csv: its first line is not a CSV header"):
        load_nodules(path)


def test_points_csv_image_paths_that_cannot_be_paths(tmp_path):
    path = tmp_path / "points.csv"
    path.write_text("x,y,z,coordinate_system,image\n1,2,3,LPS,~no-such-user-medlora/ct.nrrd\n", encoding="utf-8")
    ct = blank_ct(Geometry((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), source=str(tmp_path / "ct.nrrd"))
    with pytest.raises(AnnotationError, match="line 2: image '~no-such-user-medlora/ct.nrrd' is not a usable path"):
        load_points_csv(path, ct)


# --- LIDC XML -----------------------------------------------------------------------------------------


GRID = Geometry((64, 64, 12), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def _lidc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "read.xml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text, words", [
    (lidc_xml([[(5.0, "s", square(10, 10, 5), True)]])[:-30], "malformed at line 1"),           # truncated
    (lidc_xml([[(5.0, "s", square(10, 10, 5), True)]]).replace("<imageZposition>5.0", "<imageZposition>nan"),
     "no valid <imageZposition> (got 'nan')"),
    (lidc_xml([[(5.0, "s", square(10, 10, 5), True)]]).replace("<imageZposition>5.0", "<imageZposition>1e999"),
     "no valid <imageZposition>"),
    (lidc_xml([[(5.0, "s", [(10, 10), (10**12, 10), (12, 14)], True)]]),
     "edge-map point (x 1000000000000, y 10) at z 5 lies outside the CT's 64×64-pixel slices"),
    (lidc_xml([[(5.0, "s", [(10, 10), (-3, 10), (12, 14)], True)]]), "edge-map point (x -3, y 10)"),
    (lidc_xml([[(5.0, "s", square(10, 10, 5), True)]]).replace("<xCoord>10</xCoord>", "<xCoord>10.5</xCoord>", 1),
     "without integer <xCoord>/<yCoord>"),
    (lidc_xml([[(5.0, "s", square(10, 10, 5), True)]], malignancy=7), "malignancy 7 is outside 1–5"),
    (lidc_xml([[(5.0, "s", square(10, 10, 5), True)]]).replace("<malignancy>4", "<malignancy>high"),
     "malignancy 'high' is not an integer"),
    ('<LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader/></LidcReadMessage>', "no <readingSession>"),
    ('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a0 "aaaaaaaaaa">'
     + "".join(f'<!ENTITY a{i + 1} "{f"&a{i};" * 10}">' for i in range(9))
     + "]><LidcReadMessage>&a9;</LidcReadMessage>", "declares a DTD or entities"),       # "billion laughs"
    ('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e SYSTEM "file:///etc/passwd">]><LidcReadMessage>&e;'
     "</LidcReadMessage>", "declares a DTD or entities"),                               # external entity
])
def test_lidc_malformed_reads(tmp_path, text, words):
    path = _lidc(tmp_path, text)
    with pytest.raises(AnnotationError) as info:
        load_nodules(path, image=blank_ct(GRID, series_uid="1.2.3"), fmt="lidc")
    assert words in str(info.value) and "read.xml" in str(info.value), str(info.value)


def test_lidc_min_readers_says_how_many_readers_there_are(tmp_path):
    two_apart = [[(5.0, "s", square(10, 10, 5), True)], [(5.0, "s", square(40, 40, 5), True)]]
    path = _lidc(tmp_path, lidc_xml(two_apart))
    ct = blank_ct(GRID, series_uid="1.2.3")
    assert len(load_nodules(path, image=ct, min_readers=1)) == 2
    with pytest.raises(AnnotationError, match=r"min_readers \(--min-readers\) 3 is more than the 2 reader\(s\)"):
        load_nodules(path, image=ct, min_readers=3)
    with pytest.raises(AnnotationError, match=r"none of its 2 nodule\(s\) was marked by at least 2 of the 2 readers "
                                              r"\(the most any nodule has is 1\); lower min_readers"):
        load_nodules(path, image=ct, min_readers=2)
    with pytest.raises(AnnotationError, match="min_readers must be at least 1, got '2'"):
        load_nodules(path, image=ct, min_readers="2")


def test_lidc_reads_with_only_small_nodules_say_so(tmp_path):
    path = _lidc(tmp_path, lidc_xml([[(5.0, "s", [(20, 20)], True)]]).replace(
        "<characteristics><malignancy>4</malignancy></characteristics>", ""))
    with pytest.raises(AnnotationError, match=r"marked no nodule ≥ 3 mm; 1 nodule\(s\) < 3 mm were skipped"):
        load_nodules(path, image=blank_ct(GRID, series_uid="1.2.3"))
    (small,) = load_nodules(path, image=blank_ct(GRID, series_uid="1.2.3"), include_small=True)
    assert small.label is None


# --- training manifest --------------------------------------------------------------------------------


MANIFEST_HEADER = "image,x,y,z,coordinate_system,label,patient_id,diameter_mm"


@pytest.mark.parametrize("row, words", [
    ("ct.nrrd,1,2", "line 2: 3 cell(s) but the header has 8 columns, so it has no value for z, coordinate_system"),
    ("ct.nrrd,1,2,3,LPS,1,P1,5,extra", "line 2: 9 cells but the header has 8 columns"),
    ("ct.nrrd,1,2,3,LPS,1,P1,nan", "line 2: diameter_mm must be a positive finite number"),
    ("ct.nrrd,1,2,3,LPS,1,P1,-4", "line 2: diameter_mm must be a positive finite number"),
    ("ct.nrrd,1,x,3,LPS,1,P1,5", "line 2: x, y, z must be numbers in mm, got ('1', 'x', '3')"),
    ("ct.nrrd,1,2,inf,LPS,1,P1,5", "line 2: x, y, z must be finite"),
    ("~no-such-user-medlora/ct.nrrd,1,2,3,LPS,1,P1,5", "line 2: path '~no-such-user-medlora/ct.nrrd'"),
    ("ct\x00.nrrd,1,2,3,LPS,1,P1,5", "holds a NUL character"),
])
def test_manifest_csv_row_problems_are_collected_with_their_line(tmp_path, row, words):
    path = tmp_path / "manifest.csv"
    path.write_text(f"{MANIFEST_HEADER}\n{row}\n", encoding="utf-8")
    rows, problems = read_rows(path)
    assert rows == [] and len(problems) == 1 and words in problems[0], problems


@pytest.mark.parametrize("text, words", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('[{"image": "a", "x": ' + "1" * 5000 + "}]", "cannot be read"),
    ('[{"image": "a", "x": 1', "not valid JSON"),
    ('{"nodules": 5}', "expected a list of row objects"),
])
def test_manifest_json_that_cannot_be_read(tmp_path, text, words):
    path = tmp_path / "manifest.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError, match=None) as info:
        read_rows(path)
    assert words in str(info.value) and "manifest.json" in str(info.value)


def test_manifest_json_nested_values_are_row_problems(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"nodules": [
        {"image": "ct.nrrd", "x": [1, 2], "y": 2, "z": 3, "coordinate_system": "LPS", "label": 1},
        {"image": "ct.nrrd", "x": 1, "y": 2, "z": 3, "coordinate_system": "LPS", "label": 1, "patient_id": "P"}]}))
    rows, problems = read_rows(path)
    assert len(rows) == 1 and problems == ["item 0: 'x' must be a number or text, not a list or object"]


def test_manifest_csv_unclosed_quote_and_huge_field(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text(f'{MANIFEST_HEADER}\n"' + "a" * 200_000 + '",1,2,3,LPS,1,P1,5\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"manifest .*manifest.csv line \d+: field larger than field limit"):
        read_rows(path)


def test_dataset_check_lists_every_bad_row_and_changes_nothing(tmp_path, capsys):
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join([MANIFEST_HEADER, "ct.nrrd,1,2", "ct.nrrd,1,2,3,LPS,1,P1,-4",
                               "ct.nrrd,1,2,3,LPS,1,P1,5,extra", "~no-such-user-medlora/a,1,2,3,LPS,1,P1,5"]) + "\n",
                    encoding="utf-8")
    before = tree_digest(tmp_path)
    assert main(["dataset", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for words in ("line 2: 3 cell(s)", "line 3: diameter_mm", "line 4: 9 cells", "line 5: path"):
        assert words in err, err
    assert tree_digest(tmp_path) == before


# --- through the crop command: messages that say what actually happened --------------------------------


def _xml(folder: Path) -> Path:
    return next(folder.glob("*.xml"))


def test_crop_min_readers_above_the_readers_present(lidc_0001, tmp_path, capsys):
    before = tree_digest(lidc_0001)
    code = main(["crop", "--volume", str(lidc_0001), "--points", str(_xml(lidc_0001)), "--out", str(tmp_path / "o"),
                 "--min-readers", "5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--min-readers) 5 is more than the 4 reader(s)" in err and "use at most 4" in err
    assert tree_digest(lidc_0001) == before


def test_crop_with_the_xml_of_another_series(lidc_0001, lidc_0003, tmp_path, capsys):
    code = main(["crop", "--volume", str(lidc_0003), "--points", str(_xml(lidc_0001)), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "holds reads of series" in err and "but the CT loaded is series" in err and "pick matching" not in err


def test_crop_with_a_points_row_missing_columns(tmp_path, capsys):
    volume = save_volume(CTImage(np.zeros((8, 8, 8), np.float32), Geometry((8, 8, 8), (1.0, 1.0, 1.0), (0, 0, 0))),
                         tmp_path / "ct.nrrd")
    points = tmp_path / "points.csv"
    points.write_text("nodule_id,x,y,z,coordinate_system\nn1,1,2,3,LPS\nn2,4,5\n", encoding="utf-8")
    before = tree_digest(tmp_path)
    assert main(["crop", "--volume", str(volume), "--points", str(points), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "points.csv line 3: 3 cell(s) but the header has 5 columns, so it has no value for z, coordinate_system" \
        in err
    assert tree_digest(tmp_path) == before


# --- docs/reliability.md stays true -------------------------------------------------------------------


def test_reliability_doc_names_only_tests_that_exist():
    """Every ``Testing/<file>.py::<test>`` in docs/reliability.md is a test function in that file,
    and every table row names at least one: a renamed or deleted test cannot leave a stale row."""
    import re

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "reliability.md").read_text(encoding="utf-8")
    rows = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith("| input class")]
    assert rows, "the reliability table has no rows"
    for row in rows:
        assert re.search(r"Testing/\w+\.py::test_\w+", row), f"a row without a test: {row}"
    for file, name in set(re.findall(r"(Testing/\w+\.py)::(test_\w+)", doc)):
        source = root / file
        assert source.is_file(), f"docs/reliability.md names {file}, which does not exist"
        assert re.search(rf"^def {name}\(", source.read_text(encoding="utf-8"), re.M), \
            f"docs/reliability.md names {file}::{name}, which is not a test there"


@pytest.mark.parametrize("suffix,kind", [(".nrrd", "an NRRD image"), (".nii.gz", "an image")])
def test_an_image_given_as_points_says_it_is_an_image(tmp_path, suffix, kind):
    geometry = Geometry(origin_lps=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0), direction=np.eye(3), size=(8, 8, 8))
    volume = save_volume(blank_ct(geometry, hu=-400.0), tmp_path / f"ct{suffix}")
    before = tree_digest(tmp_path)
    for read in (lambda: load_nodules(volume, fmt="points"), lambda: read_rows(volume)):
        with pytest.raises((AnnotationError, DatasetError), match=f"is {kind}.*not a .* file: give the CT as the volume"):
            read()
    assert tree_digest(tmp_path) == before
