"""Property-based fuzzing of the readers a user feeds files to (issue 11).

The markups ``.json``, points CSV and training-manifest readers get random JSON structures,
random text and bytes, huge and non-finite numbers, broken quoting and odd paths. The only
outcomes allowed are success or a ``MedLoRAError``: any other exception (a traceback from
inside json, csv, numpy or pathlib) fails, and so does a call that runs longer than its time
box. Each test runs a bounded number of examples (100; ``MEDLORA_FUZZ_EXAMPLES`` raises it) so
the file takes seconds in CI; a failure prints the smallest input hypothesis found.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MedLoRALib.annotations import load_nodules
from MedLoRALib.annotations.markups import load_markups
from MedLoRALib.annotations.nlstx import COLUMNS as NLSTX_COLUMNS
from MedLoRALib.annotations.points_csv import load_points_csv
from MedLoRALib.ctio import load_ct, save_volume
from MedLoRALib.errors import MedLoRAError
from MedLoRALib.geometry import Geometry
from MedLoRALib.image import CTImage
from MedLoRALib.training.manifest import load_training_set, read_rows

TIME_BOX_S = 10  # per call; generous for a busy 2-core CI machine, finite for a hang
# about 100 examples per test in CI; MEDLORA_FUZZ_EXAMPLES=5000 for a longer hunt
FUZZ = settings(max_examples=int(os.environ.get("MEDLORA_FUZZ_EXAMPLES", "100")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextmanager
def time_box(seconds: float):
    """Fail instead of hanging: SIGALRM interrupts a call that runs past ``seconds``."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"a reader ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def only_medlora_errors(read, path: Path, data: bytes):
    """Write ``data`` to ``path`` and read it: success or MedLoRAError, nothing else, in time."""
    path.write_bytes(data)
    with time_box(TIME_BOX_S):
        try:
            return read(path)
        except MedLoRAError as exc:
            assert str(exc).strip(), "an error without a message"
            return None


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A scratch folder with a tiny CT (``ct.nrrd``) that fuzzed manifests may name."""
    root = tmp_path_factory.mktemp("fuzz")
    geometry = Geometry((16, 16, 8), (2.0, 2.0, 3.0), (-16.0, -16.0, -12.0))
    voxels = np.full((8, 16, 16), 40.0, np.float32)
    save_volume(CTImage(voxels, geometry), root / "ct.nrrd")
    return root


@pytest.fixture(scope="module")
def ct(folder) -> CTImage:
    return load_ct(folder / "ct.nrrd")


# --- values that break readers ------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**300), 10**300),
    st.sampled_from([0, -0.0, 1e-320, 1.7976931348623157e308, 10**20]))
JSON_SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12))
JSON_ANY = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
VECTORS = st.one_of(st.lists(JSON_SCALARS, min_size=0, max_size=10), st.lists(NUMBERS, min_size=3, max_size=3),
                    st.lists(NUMBERS, min_size=9, max_size=9), JSON_ANY)
# raw JSON number tokens json.dumps would not write: 400- and 5000-digit integers, 1e999
RAW_TOKENS = st.one_of(st.floats(allow_nan=False, allow_infinity=False).map(repr),
                       st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "9" * 400, "1" * 5000,
                                        "true", "null", '"12.5"', '"left"', "[]", "{}", "1.5e-400", "-0"]))

POINTS = st.fixed_dictionaries({}, optional={
    "position": VECTORS, "orientation": VECTORS, "label": JSON_SCALARS,
    "positionStatus": st.sampled_from(["defined", "preview", "undefined", "DEFINED", "", 3, None]),
    "description": st.one_of(st.text(max_size=40), st.sampled_from(
        ["malignant; malignancy=5; diameter_mm=12.5", "malignancy=e", "diameter_mm=-1", "malignancy=1e999",
         "benign malignant", "diameter_mm=0.0"]))})
MARKUPS = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["Fiducial", "ROI", "Line", "Curve", "Plane", 5, None]),
    "name": JSON_SCALARS, "coordinateSystem": st.sampled_from(["LPS", "RAS", "ras", " lps ", "IJK", 1, None, []]),
    "coordinateUnits": st.sampled_from(["mm", "um", ["mm"], [], {}, None]),
    "controlPoints": st.one_of(st.lists(POINTS, max_size=4), JSON_SCALARS),
    "center": VECTORS, "size": VECTORS, "orientation": VECTORS})
DOCUMENTS = st.one_of(st.fixed_dictionaries({"markups": st.one_of(st.lists(MARKUPS, max_size=3), JSON_ANY)}),
                      JSON_ANY)


# --- markups .json --------------------------------------------------------------------------------------


@FUZZ
@given(document=DOCUMENTS)
def test_markups_random_structures(folder, document):
    text = json.dumps(document)  # NaN and Infinity are written as JSON's non-standard literals
    nodules = only_medlora_errors(load_markups, folder / "random.mrk.json", text.encode())
    for nodule in nodules or []:
        assert np.isfinite(nodule.centre_lps).all()


@FUZZ
@given(tokens=st.lists(RAW_TOKENS, min_size=0, max_size=5), status=st.sampled_from(["defined", "preview"]))
def test_markups_raw_number_tokens(folder, tokens, status):
    point = f'{{"position": [{", ".join(tokens)}], "positionStatus": "{status}"}}'
    text = f'{{"markups": [{{"type": "Fiducial", "controlPoints": [{point}]}}]}}'
    nodules = only_medlora_errors(load_markups, folder / "tokens.mrk.json", text.encode())
    if nodules:  # accepted only when it really was three finite numbers
        assert len(tokens) == 3 and np.isfinite(nodules[0].centre_lps).all()


@FUZZ
@given(data=st.one_of(st.binary(max_size=400), st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace")),
                      st.sampled_from([b'"' + b"a" * 200_000, b"a" * 200_000 + b",x\n1,2\n", b"\xff\xfe" + b"x" * 9,
                                       b"<" * 50_000, b"{" * 50_000, b"\x00" * 1000])))
def test_every_reader_on_random_bytes(folder, data):
    only_medlora_errors(load_markups, folder / "bytes.mrk.json", data)
    only_medlora_errors(load_points_csv, folder / "bytes.csv", data)
    only_medlora_errors(load_nodules, folder / "bytes.any", data)  # format detection first
    only_medlora_errors(read_rows, folder / "bytes-manifest.csv", data)
    only_medlora_errors(read_rows, folder / "bytes-manifest.json", data)


# --- points CSV and manifest CSV --------------------------------------------------------------------------

COLUMNS = ["x", "y", "z", "coordinate_system", "label", "malignancy", "diameter_mm", "nodule_id", "patient_id",
           "image", "annotations", "series_uid"]
OTHER_CSV_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "class", *NLSTX_COLUMNS.values()]  # LUNA16, NLSTx
CELLS = st.one_of(
    st.text(max_size=10),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["LPS", "RAS", "lps", "nan", "inf", "-inf", "1e999", "1e-400", "9" * 400, "", " ", "benign",
                     "M", "3", "0", "1.0", '"', '"a,b"', "a\nb", "a\rb", "\x00", "~no-such-user/x", "../ct.nrrd",
                     "ct.nrrd", "x" * 300]))
ROWS = st.lists(st.lists(CELLS, max_size=14), max_size=5)


def csv_text(header: list[str], rows: list[list[str]], delimiter: str, quoted: bool) -> bytes:
    """CSV as csv.writer writes it (``quoted``), or cells joined by hand so quotes and
    delimiters inside cells break the layout as a hand-edited file would."""
    if quoted:
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        text = "\n".join(delimiter.join(cells) for cells in [header, *rows])
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(header=st.lists(st.sampled_from(COLUMNS) | st.text(max_size=6), min_size=1, max_size=12), rows=ROWS,
       delimiter=st.sampled_from([",", ";", "\t"]), quoted=st.booleans())
def test_points_csv_random_rows(folder, header, rows, delimiter, quoted):
    nodules = only_medlora_errors(load_points_csv, folder / "points.csv", csv_text(header, rows, delimiter, quoted))
    for nodule in nodules or []:
        assert np.isfinite(nodule.centre_lps).all()


@FUZZ
@given(header=st.lists(st.sampled_from(OTHER_CSV_COLUMNS) | st.sampled_from(COLUMNS), min_size=1, max_size=14),
       rows=ROWS, quoted=st.booleans())
def test_luna16_and_nlstx_csv_random_rows(folder, ct, header, rows, quoted):
    """Format detection, then the LUNA16 or NLSTx importer (placed in a CT, as NLSTx needs)."""
    for nodule in only_medlora_errors(lambda p: load_nodules(p, image=ct), folder / "other.csv",
                                      csv_text(header, rows, ",", quoted)) or []:
        assert np.isfinite(nodule.centre_lps).all()


@FUZZ
@given(header=st.lists(st.sampled_from(COLUMNS) | st.text(max_size=6), min_size=1, max_size=12), rows=ROWS,
       quoted=st.booleans())
def test_manifest_csv_random_rows(folder, header, rows, quoted):
    result = only_medlora_errors(read_rows, folder / "manifest.csv", csv_text(header, rows, ",", quoted))
    for row in (result or ([], []))[0]:
        assert row.centre_lps is None or np.isfinite(row.centre_lps).all()
        assert row.diameter_mm is None or 0 < row.diameter_mm < np.inf


# --- manifest JSON and whole-manifest checks --------------------------------------------------------------

MANIFEST_ITEMS = st.lists(st.dictionaries(st.sampled_from(COLUMNS) | st.text(max_size=6),
                                          st.one_of(CELLS, NUMBERS, JSON_ANY), max_size=10), max_size=4)


@FUZZ
@given(items=st.one_of(MANIFEST_ITEMS, st.fixed_dictionaries({"nodules": MANIFEST_ITEMS}), JSON_ANY))
def test_manifest_json_random_structures(folder, items):
    only_medlora_errors(read_rows, folder / "manifest.json", json.dumps(items).encode())


SAFE_IMAGES = st.sampled_from(["ct.nrrd", "./ct.nrrd", "missing.nrrd", "", "ct.nrrd/inside"])


@FUZZ
@given(items=st.lists(st.fixed_dictionaries(
    {"image": SAFE_IMAGES},
    optional={c: st.one_of(CELLS, NUMBERS) for c in COLUMNS if c not in ("image", "annotations")}), max_size=5))
def test_load_training_set_random_rows(folder, items):
    """The whole manifest check (images loaded, points located, duplicates, labels): image paths
    stay inside the scratch folder, so no fuzzed path makes it walk the real file system."""
    path = folder / "training.json"
    result = only_medlora_errors(lambda p: load_training_set(p, keep_images=False), path,
                                 json.dumps({"nodules": items}).encode())
    if result is not None:
        dataset, problems = result
        assert all(isinstance(p, str) and p for p in problems)
        assert all(np.isfinite(s.centre_lps).all() and s.label in (0, 1) for s in dataset.samples)
