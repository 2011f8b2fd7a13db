"""``medlora score`` and ``medlora adapters`` end to end on the synthetic phantom (and real LIDC)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from MedLoRALib.adapters.store import AdapterStore
from MedLoRALib.cli import main
from MedLoRALib.cli.score import RANDOM_INIT_NOTE
from MedLoRALib.ctio import load_ct
from MedLoRALib.engine import ScoringEngine
from MedLoRALib.geometry import lps_to_ras
from MedLoRALib.models import LoraSpec
from MedLoRALib.patches import PatchSpec
from MedLoRALib.synthetic import make_phantom, write_cohort, write_dicom_series

torch.set_num_threads(1)  # a busy 2-core CI machine: more threads only contend
SPEC = PatchSpec(views="multiview9", fov_mm=50.0, pixels=32)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, tiny_adapter):
    """A store holding one tiny random-init adapter (changed head and LoRA) named 'tiny'."""
    path = tiny_adapter("tiny", SPEC, lora=LoraSpec(rank=4), manifest={"threshold": 0.5})
    root = tmp_path_factory.mktemp("store")
    AdapterStore(root / "adapters").import_(path)
    return root / "adapters"


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    """The phantom as a DICOM series plus a points CSV (half the rows in RAS, as Slicer gives them)."""
    image, nodules = make_phantom(seed=3, case_id="PH-1")
    folder = write_dicom_series(image, tmp_path_factory.mktemp("ct") / "series", patient_id="PH-1")
    points = folder.parent / "points.csv"
    with points.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["nodule_id", "x", "y", "z", "coordinate_system"])
        for index, nodule in enumerate(nodules):
            if index % 2:
                writer.writerow([nodule.nodule_id, *lps_to_ras(np.array(nodule.centre_lps)), "RAS"])
            else:
                writer.writerow([nodule.nodule_id, *nodule.centre_lps, "LPS"])
    return folder, points, nodules


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_score_phantom_end_to_end(phantom_case, store_root, tmp_path, capsys):
    folder, points, nodules = phantom_case
    out = tmp_path / "results.csv"
    code = main(["score", "--volume", str(folder), "--points", str(points), "--adapter", "tiny",
                 "--store", str(store_root), "--out", str(out), "--device", "cpu"])
    assert code == 0
    rows = _read_csv(out)
    assert [r["nodule_id"] for r in rows] == [n.nodule_id for n in nodules]
    for row, nodule in zip(rows, nodules):
        assert np.allclose([float(row[c]) for c in ("x_lps", "y_lps", "z_lps")], nodule.centre_lps, atol=1e-3)
        assert 0.0 < float(row["probability"]) < 1.0
        assert row["random_init"] == "true" and row["note"] == RANDOM_INIT_NOTE
        assert len(row["view_probabilities"].split(";")) == 9 and row["adapter"] == "tiny"
    # the same numbers as the engine gives for the same CT and nodules (TTA on)
    engine = ScoringEngine(device="cpu", store=AdapterStore(store_root))
    engine.attach_adapter("tiny")
    direct = engine.score(load_ct(folder), nodules)
    assert np.allclose([float(r["probability"]) for r in rows], [d["probability"] for d in direct], atol=1e-12)
    assert "randomly initialised" in capsys.readouterr().err


def test_score_json_and_no_tta(phantom_case, store_root, tmp_path):
    folder, points, nodules = phantom_case
    out = tmp_path / "results.json"
    assert main(["score", "--volume", str(folder), "--points", str(points), "--adapter", "tiny", "--store",
                 str(store_root), "--out", str(out), "--device", "cpu", "--no-tta"]) == 0
    data = json.loads(out.read_text())
    assert data["adapter"]["random_init"] is True and data["adapter"]["tta"] == "none"
    assert len(data["results"]) == len(nodules) and {r["tta"] for r in data["results"]} == {"none"}
    assert all(r["random_init"] is True and r["note"] == RANDOM_INIT_NOTE for r in data["results"])
    assert all(len(r["view_probabilities"]) == 9 for r in data["results"])


def test_score_tta_set_overrides_the_adapters_own(phantom_case, tiny_adapter, tmp_path, capsys):
    """Without --tta the adapter's own set scores (its manifest's tta); --tta SET or a count overrides it, and
    the JSON and CSV name the set used; an unknown set is refused before anything is written."""
    folder, points, nodules = phantom_case
    adapter = tiny_adapter("tiny-rot4", SPEC, lora=LoraSpec(rank=4), manifest={"tta": "rot4"})
    engine = ScoringEngine(device="cpu")
    engine.attach_adapter(adapter)
    ct = load_ct(folder)
    expected = {name: [r["probability"] for r in engine.score(ct, nodules, tta=name)] for name in ("rot4", "d8")}
    assert not np.allclose(expected["rot4"], expected["d8"])

    def score(*extra, suffix=".json"):
        out = tmp_path / f"scores{len(list(tmp_path.iterdir()))}{suffix}"
        code = main(["score", "--volume", str(folder), "--points", str(points), "--adapter", str(adapter),
                     "--out", str(out), "--device", "cpu", *extra])
        return code, out

    for extra, name in (((), "rot4"), (("--tta", "rot4"), "rot4"), (("--tta", "d8"), "d8"), (("--tta", "8"), "d8")):
        code, out = score(*extra)
        data = json.loads(out.read_text())
        assert code == 0 and data["adapter"]["tta"] == name and {r["tta"] for r in data["results"]} == {name}
        assert np.allclose([r["probability"] for r in data["results"]], expected[name], atol=1e-12, rtol=0)
    code, out = score("--tta", "d8", suffix=".csv")
    assert code == 0 and {row["tta"] for row in _read_csv(out)} == {"d8"}
    capsys.readouterr()
    code, out = score("--tta", "eight")
    assert code == 2 and not out.exists()
    assert "unknown test-time augmentation 'eight'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # --tta and --no-tta contradict each other (argparse)
        main(["score", "--volume", str(folder), "--points", str(points), "--adapter", str(adapter),
              "--tta", "rot4", "--no-tta"])
    assert exited.value.code == 2 and "--no-tta: not allowed with argument --tta" in capsys.readouterr().err


def test_overwrite_replaces_results_written_before_the_tta_column_and_nothing_else(tmp_path):
    from MedLoRALib.cli.score import COLUMNS, ENSEMBLE_COLUMNS, check_results_output
    from MedLoRALib.errors import MedLoRAError

    for columns in (COLUMNS, ENSEMBLE_COLUMNS, COLUMNS[:-1], (*ENSEMBLE_COLUMNS[:-1], "p_a", "p_b")):
        out = tmp_path / "scores.csv"
        out.write_text(",".join(columns) + "\n")
        check_results_output(out, overwrite=True)  # an earlier medlora score result, old or new
        with pytest.raises(MedLoRAError, match="pass --overwrite"):
            check_results_output(out, overwrite=False)
    out.write_text("study,nodule_id,case_id,x_lps,y_lps,z_lps,probability,mine\n")
    with pytest.raises(MedLoRAError, match="not a medlora score results file"):
        check_results_output(out, overwrite=True)


def test_score_folder_of_studies(store_root, tmp_path, capsys):
    manifest = write_cohort(tmp_path / "cohort", n_cases=2, seed=5)
    (tmp_path / "cohort" / "broken").mkdir()  # a study folder without a readable CT
    out = tmp_path / "cohort.csv"
    code = main(["score", "--volume", str(tmp_path / "cohort"), "--points", str(manifest), "--adapter", "tiny",
                 "--store", str(store_root), "--out", str(out), "--device", "cpu", "--no-tta"])
    assert code == 2  # one study failed: reported, the others scored
    rows = _read_csv(out)
    expected = _read_csv(manifest)
    assert sorted(r["nodule_id"] for r in rows) == sorted(r["nodule_id"] for r in expected)
    assert {r["study"] for r in rows} == {"SYN-0001.nrrd", "SYN-0002.nrrd"}
    for row in rows:
        assert row["case_id"] == row["nodule_id"].split("/")[0]  # each nodule scored in its own study
    assert "broken" in capsys.readouterr().err


def test_score_refuses_bad_input(phantom_case, store_root, tmp_path, capsys):
    folder, points, _ = phantom_case
    base = ["score", "--volume", str(folder), "--points", str(points), "--store", str(store_root), "--device", "cpu"]
    assert main([*base, "--adapter", "missing-adapter"]) == 2
    assert "neither a folder or .zip on disk nor a name in the store" in capsys.readouterr().err
    assert main([*base, "--adapter", "tiny", "--out", str(tmp_path / "x.txt")]) == 2
    assert ".csv or .json" in capsys.readouterr().err
    far = tmp_path / "far.csv"
    far.write_text("x,y,z,coordinate_system\n900,900,900,LPS\n")
    assert main([*base[:3], "--points", str(far), *base[5:], "--adapter", "tiny"]) == 2
    assert "outside" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.csv.*"))  # no temporary files left


def test_adapters_cli(store_root, tmp_path, capsys):
    store = tmp_path / "store"
    source = AdapterStore(store_root).path("tiny")
    assert main(["adapters", "--store", str(store), "list"]) == 0
    assert "no adapters" in capsys.readouterr().out
    assert main(["adapters", "--store", str(store), "import", str(source), "--name", "site-a"]) == 0
    assert main(["adapters", "--store", str(store), "list"]) == 0
    listing = capsys.readouterr().out
    assert "site-a" in listing and "RANDOM INIT" in listing and "multiview9 32 px" in listing
    assert main(["adapters", "--store", str(store), "info", "site-a", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "site-a"
    assert main(["adapters", "--store", str(store), "export", "site-a", str(tmp_path / "a.zip")]) == 0
    assert main(["adapters", "--store", str(store), "info", str(tmp_path / "a.zip")]) == 0
    assert "version:" in capsys.readouterr().out
    assert main(["adapters", "--store", str(store), "import", str(tmp_path / "a.zip")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["adapters", "--store", str(store), "rename", "site-a", "site-b"]) == 0
    assert main(["adapters", "--store", str(store), "delete", "site-b"]) == 0
    assert AdapterStore(store).names() == []
    assert main(["adapters", "--store", str(store), "info", "site-b"]) == 2


def test_score_real_lidc_case_with_its_xml(lidc_0001, store_root, tmp_path):
    xml = next(lidc_0001.glob("*.xml"))
    out = tmp_path / "lidc.csv"
    assert main(["score", "--volume", str(lidc_0001), "--points", str(xml), "--adapter", "tiny",
                 "--store", str(store_root), "--out", str(out), "--device", "cpu", "--no-tta"]) == 0
    rows = _read_csv(out)
    assert rows and all(r["random_init"] == "true" for r in rows)
    assert all(0.0 < float(r["probability"]) < 1.0 for r in rows)


def test_out_naming_a_folder_is_refused_before_any_model_loads(tmp_path, phantom_case, capsys):
    folder, points, _ = phantom_case
    taken = tmp_path / "results.csv"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    code = main(["score", "--volume", str(folder), "--points", str(points), "--adapter", "no-such-adapter",
                 "--out", str(taken)])
    err = capsys.readouterr().err
    assert code == 2 and "is a folder" in err and "results.csv" in err and "Traceback" not in err
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]


def test_out_replaces_only_an_earlier_result_and_only_with_overwrite(phantom_case, store_root, tmp_path, capsys):
    from helpers import tree_digest

    folder, points, _ = phantom_case
    base = ["score", "--volume", str(folder), "--points", str(points), "--adapter", "tiny", "--store", str(store_root),
            "--device", "cpu", "--no-tta"]
    notes = tmp_path / "notes.csv"
    notes.write_text("patient,remark\nP1,keep me\n")
    before = tree_digest(notes)
    for extra in ([], ["--overwrite"]):  # a file medlora score did not write is never replaced
        assert main([*base, "--out", str(notes), *extra]) == 2
        assert "--out" in capsys.readouterr().err
    assert tree_digest(notes) == before
    out = tmp_path / "results.json"
    assert main([*base, "--out", str(out)]) == 0
    assert main([*base, "--out", str(out)]) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*base, "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["results"]


def test_folder_rows_match_a_series_folder_inside_a_study_or_a_series_uid(store_root, tmp_path, capsys):
    """TCIA lays a study out as patient/study/series: a row may name the series folder, or give only
    its series_uid; a row that names no study is reported, never dropped silently."""
    from MedLoRALib.synthetic import PhantomConfig

    root, config = tmp_path / "download", PhantomConfig(size=(128, 112, 40), n_nodules=1)
    uids = {}
    with (tmp_path / "points.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", "z", "coordinate_system", "image", "series_uid"])
        for seed, patient in ((0, "P-1"), (2, "P-2")):
            image, nodules = make_phantom(config, seed=seed, case_id=patient)
            series = write_dicom_series(image, root / patient / "study" / "series", patient_id=patient)
            uids[patient] = load_ct(series).ids.series_uid
            by_image, by_uid = (str(series.relative_to(tmp_path)), ""), ("", uids[patient])
            writer.writerow([*nodules[0].centre_lps, "LPS", *(by_image if patient == "P-1" else by_uid)])
        writer.writerow([0.0, 0.0, 0.0, "LPS", "download/P-9", ""])  # no such study
    out = tmp_path / "results.csv"
    assert main(["score", "--volume", str(root), "--points", str(tmp_path / "points.csv"), "--adapter", "tiny",
                 "--store", str(store_root), "--out", str(out), "--device", "cpu", "--no-tta"]) == 0
    assert sorted(row["study"] for row in _read_csv(out)) == ["P-1", "P-2"]
    assert "1 of 3 rows" in capsys.readouterr().err
