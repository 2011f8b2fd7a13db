"""The DICOM SR of malignancy scores (TID 1500), written for the real LIDC-IDRI-0001 series.

The scores come from the real engine with a tiny (random-init) adapter; the SR is read back with
highdicom and pydicom, checked by dicom3tools' ``dciodvfy`` where it is installed, and refused for a
volume without DICOM origin.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from helpers import assert_imports_without, tree_digest

from MedLoRALib.adapters import AdapterManifest
from MedLoRALib.annotations import load_nodules
from MedLoRALib.ctio import load_ct, save_volume
from MedLoRALib.nodule import Nodule
from MedLoRALib.patches import PatchSpec
from MedLoRALib.report.sr import (
    COMPREHENSIVE_3D_SR,
    LABEL_CONCEPT,
    NOT_CLINICAL,
    PRIVATE_SCHEME,
    RANDOM_INIT_PARAMETER,
    SRError,
    algorithm_parameters,
    manifest_sha256,
    write_score_sr,
)

hd = pytest.importorskip("highdicom")
SPEC = PatchSpec(views="ortho3", fov_mm=50.0, pixels=32)
# A second point 25 mm from the LIDC nodule (in lung on this slice), so the SR holds two groups.
SHIFT_LPS = np.array([25.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def scored(lidc_0001, tiny_adapter, tmp_path_factory):
    """LIDC-IDRI-0001 scored by the engine at its XML nodule and one more point; the SR written."""
    import torch

    from MedLoRALib.engine import ScoringEngine

    torch.set_num_threads(1)
    ct = load_ct(lidc_0001)
    (xml_nodule,) = load_nodules(next(lidc_0001.glob("*.xml")), image=ct)
    extra = Nodule(centre_lps=tuple(np.array(xml_nodule.centre_lps) + SHIFT_LPS), nodule_id="extra-point")
    nodules = [xml_nodule, extra]
    engine = ScoringEngine(device="cpu")
    manifest = engine.attach_adapter(tiny_adapter("tiny-sr", SPEC, manifest={"threshold": 0.5}))
    results = engine.score(ct, nodules, tta=False)
    out = tmp_path_factory.mktemp("sr") / "scores.dcm"
    write_score_sr(out, ct, nodules, results, manifest, tta=False)
    return ct, nodules, results, manifest, out


def _groups(path):
    sr = hd.sr.srread(path)
    return sr, sr.content.get_planar_roi_measurement_groups()


@pytest.mark.slow
def test_sr_reads_back_to_the_same_points_and_probabilities(scored, lidc_0001):
    ct, nodules, results, manifest, out = scored
    sr, groups = _groups(out)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR"
    assert sr.StudyInstanceUID == ct.ids.study_uid and sr.SeriesInstanceUID != ct.ids.series_uid
    assert len(groups) == len(nodules) == 2
    frame_uid = pydicom.dcmread(next(lidc_0001.glob("*.dcm")), stop_before_pixels=True).FrameOfReferenceUID
    for group, nodule, result in zip(groups, nodules, results):
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert region.frame_of_reference_uid == frame_uid
        # DICOM patient coordinates are LPS: the point is the nodule's centre_lps, not flipped
        assert np.allclose(region.value, [nodule.centre_lps], atol=0.01, rtol=0)
        assert group.tracking_identifier == nodule.nodule_id
        (probability,) = group.get_measurements(name=pydicom.sr.codedict.codes.DCM.ProbabilityOfCancer)
        assert probability.value == pytest.approx(result["probability"], abs=1e-12)
        assert probability.unit.value == "1" and probability.unit.scheme_designator == "UCUM"
        (label,) = group.get_qualitative_evaluations(name=hd.sr.CodedConcept(*LABEL_CONCEPT))
        assert label.value.meaning.lower() == result["label"]
        assert label.value.scheme_designator == "SCT"
    # the two results differ, so a swapped or repeated value would be caught
    assert groups[0].roi.value.tolist() != groups[1].roi.value.tolist()


@pytest.mark.slow
def test_sr_references_every_image_of_the_series_and_identifies_the_algorithm(scored, lidc_0001):
    ct, _, _, manifest, out = scored
    ds = pydicom.dcmread(out)
    (evidence,) = ds.CurrentRequestedProcedureEvidenceSequence
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ct.ids.series_uid
    referenced = {item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence}
    expected = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in lidc_0001.glob("*.dcm")}
    assert referenced == expected and len(referenced) == ct.geometry.size[2]
    assert ds.PatientID == pydicom.dcmread(next(lidc_0001.glob("*.dcm")), stop_before_pixels=True).PatientID
    assert ds.PreliminaryFlag == "PRELIMINARY" and ds.VerificationFlag == "UNVERIFIED"
    assert ds.SeriesDescription.startswith(NOT_CLINICAL)  # the tiny adapter's backbone is random-init
    group = hd.sr.srread(out).content.get_planar_roi_measurement_groups()[0]
    algorithm: dict[str, list[str]] = {}  # TID 4019 items of the measurement group, by concept name
    for item in group[0].ContentSequence:
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning.startswith("Algorithm"):
            algorithm.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item.TextValue)
    assert algorithm["Algorithm Name"] == ["tiny-sr"] and algorithm["Algorithm Version"] == [manifest.version_id]
    parameters = algorithm["Algorithm Parameters"]
    assert f"backbone={manifest.backbone}" in parameters
    assert f"manifest_sha256={manifest_sha256(manifest)}" in parameters
    assert RANDOM_INIT_PARAMETER in parameters and "tta=none" in parameters  # the set used: none


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not installed (Debian/Ubuntu: apt-get install dicom3tools)")
def test_sr_passes_dciodvfy_without_errors(scored):
    out = scored[-1]
    check = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=60)
    report = check.stdout + check.stderr
    assert "Comprehensive3DSR" in report  # it recognised the IOD
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == [], report


@pytest.mark.slow
def test_sr_from_the_series_files_as_slicer_lists_them(scored, lidc_0001, tmp_path):
    ct, nodules, results, manifest, out = scored
    files = sorted(lidc_0001.glob("*"))  # the series' files plus the XML, which is skipped
    again = write_score_sr(tmp_path / "again.dcm", ct, nodules, results, manifest, dicom_files=files)
    first, second = pydicom.dcmread(out), pydicom.dcmread(again)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert (first.CurrentRequestedProcedureEvidenceSequence == second.CurrentRequestedProcedureEvidenceSequence)


@pytest.mark.slow
def test_sr_never_replaces_a_file_medlora_did_not_write(scored, tmp_path):
    ct, nodules, results, manifest, out = scored
    foreign = tmp_path / "foreign.dcm"
    foreign.write_bytes(b"somebody else's file")
    before = tree_digest(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(SRError, match="foreign.dcm"):
            write_score_sr(foreign, ct, nodules, results, manifest, overwrite=overwrite)
    assert tree_digest(tmp_path) == before
    ours = tmp_path / "ours.dcm"
    shutil.copy(out, ours)
    with pytest.raises(SRError, match="already exists"):
        write_score_sr(ours, ct, nodules, results, manifest)
    old_uid = pydicom.dcmread(ours).SOPInstanceUID
    write_score_sr(ours, ct, nodules, results, manifest, overwrite=True)
    assert pydicom.dcmread(ours).SOPInstanceUID != old_uid


@pytest.mark.slow
def test_sr_refuses_results_that_do_not_fit_the_nodules(scored, tmp_path):
    ct, nodules, results, manifest, _ = scored
    out = tmp_path / "bad.dcm"
    cases = {
        "2 nodules": (nodules, results[:1]),
        "results must follow the nodules' order": (nodules, results[::-1]),
        "no probability in": (nodules, [{**results[0], "probability": float("nan")}, results[1]]),
        "not one of adapter": (nodules, [{**results[0], "label": "cancer"}, results[1]]),
        "at least one nodule": ([], []),
    }
    for message, (some_nodules, some_results) in cases.items():
        with pytest.raises(SRError, match=message):
            write_score_sr(out, ct, some_nodules, some_results, manifest)
    assert not out.exists()


@pytest.mark.slow
def test_sr_codes_an_adapters_own_class_names_in_medloras_scheme(scored, tmp_path):
    ct, nodules, results, manifest, _ = scored
    renamed = AdapterManifest.from_dict({**manifest.to_dict(), "label_names": ["low risk", "high risk"]})
    relabelled = [{**r, "label": "high risk" if r["label"] == "malignant" else "low risk"} for r in results]
    out = write_score_sr(tmp_path / "renamed.dcm", ct, nodules, relabelled, renamed)
    for group, result in zip(_groups(out)[1], relabelled):
        (label,) = group.get_qualitative_evaluations(name=hd.sr.CodedConcept(*LABEL_CONCEPT))
        assert label.value.meaning == result["label"] and label.value.scheme_designator == PRIVATE_SCHEME
    assert pydicom.dcmread(out).CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME


@pytest.mark.slow
def test_sr_for_a_volume_without_dicom_origin_says_it_needs_the_series(scored, tmp_path):
    ct, nodules, results, manifest, _ = scored
    nrrd = load_ct(save_volume(ct, tmp_path / "ct.nrrd"))
    out = tmp_path / "scores.dcm"
    with pytest.raises(SRError, match=r"ct\.nrrd was not read from DICOM.*--volume DICOM_FOLDER"):
        write_score_sr(out, nrrd, nodules, results, manifest)
    assert not out.exists()


@pytest.mark.slow
def test_sr_child_process_for_slicer_before_5_12(scored, lidc_0001, tmp_path):
    """``python -m MedLoRALib.report`` writes the same SR from a JSON request, and answers bad ones in one line."""
    import json

    from MedLoRALib.report.request import child_command, sr_request

    ct, nodules, results, manifest, out = scored
    files = sorted(lidc_0001.glob("*.dcm"))
    request = sr_request(tmp_path / "child.dcm", ct.ids, nodules, results, manifest, dicom_files=files, tta=False)

    def run(payload):
        done = subprocess.run(child_command(), input=json.dumps(payload),
                              capture_output=True, text=True, timeout=120)
        return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])

    assert run(request) == (0, {"event": "done", "path": request["out"]})
    child, parent = _groups(request["out"])[1], _groups(out)[1]
    assert [g.roi.value.tolist() for g in child] == [g.roi.value.tolist() for g in parent]
    probability = pydicom.sr.codedict.codes.DCM.ProbabilityOfCancer
    assert [g.get_measurements(name=probability)[0].value for g in child] == [r["probability"] for r in results]
    code, event = run({**request, "series_uid": "", "out": str(tmp_path / "none.dcm")})
    assert code == 2 and event["event"] == "error" and "not read from DICOM" in event["message"]
    code, event = run({**request, "results": "0.5", "out": str(tmp_path / "none.dcm")})
    assert code == 2 and "results must be a list" in event["message"]
    assert not (tmp_path / "none.dcm").exists()


def test_random_init_is_a_parameter_of_the_algorithm_and_only_then():
    random = AdapterManifest(name="a", backbone="medlora_tiny", backbone_sha256="random-init", random_init=True,
                             lora={"rank": 4})
    trained = AdapterManifest(name="a", backbone="medlora_tiny", backbone_sha256="ab" * 32, lora={"rank": 4})
    assert RANDOM_INIT_PARAMETER in algorithm_parameters(random)
    assert RANDOM_INIT_PARAMETER not in algorithm_parameters(trained)
    assert "tta=d8" in algorithm_parameters(trained, tta=True)  # TTA on: the adapter's own set, named
    # the manifest hash follows every field, and not the way the manifest was read
    assert manifest_sha256(trained) == manifest_sha256(AdapterManifest.from_dict(trained.to_dict()))
    assert manifest_sha256(trained) != manifest_sha256(AdapterManifest(**{**trained.to_dict(), "threshold": 0.4}))


def _score_has_sr_flag() -> bool:
    from MedLoRALib.cli import score

    parser = argparse.ArgumentParser()
    score.add_arguments(parser)
    return any("--sr" in action.option_strings for action in parser._actions)


@pytest.mark.slow
@pytest.mark.skipif(not _score_has_sr_flag(), reason="medlora score has no --sr flag yet (cli/score.py integration)")
def test_score_cli_writes_the_sr_and_refuses_it_for_nrrd(lidc_0001, tiny_adapter, tmp_path, capsys):
    from MedLoRALib.cli import main

    adapter = tiny_adapter("tiny-sr", SPEC, manifest={"threshold": 0.5})
    xml = next(lidc_0001.glob("*.xml"))
    table, out = tmp_path / "scores.csv", tmp_path / "scores.dcm"
    common = ["--adapter", str(adapter), "--device", "cpu", "--no-tta"]
    assert main(["score", "--volume", str(lidc_0001), "--points", str(xml), *common, "--out", str(table),
                 "--sr", str(out)]) == 0
    (row,) = list(csv.DictReader(table.open(newline="")))
    (group,) = _groups(out)[1]
    assert np.allclose(group.roi.value, [[float(row["x_lps"]), float(row["y_lps"]), float(row["z_lps"])]], atol=0.01)
    (probability,) = group.get_measurements(name=pydicom.sr.codedict.codes.DCM.ProbabilityOfCancer)
    assert probability.value == pytest.approx(float(row["probability"]), abs=1e-9)
    before = out.read_bytes()
    assert main(["score", "--volume", str(lidc_0001), "--points", str(xml), *common, "--sr", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before

    nrrd = save_volume(load_ct(lidc_0001), tmp_path / "ct.nrrd")
    points = tmp_path / "points.csv"
    points.write_text("x,y,z,coordinate_system\n" + ",".join(row[k] for k in ("x_lps", "y_lps", "z_lps")) + ",LPS\n")
    assert main(["score", "--volume", str(nrrd), "--points", str(points), *common,
                 "--sr", str(tmp_path / "nrrd.dcm")]) == 2
    assert "not read from DICOM" in capsys.readouterr().err and not (tmp_path / "nrrd.dcm").exists()


def test_the_sr_module_loads_without_torch_or_highdicom():
    """3D Slicer before 5.12 has no highdicom: the module must still import there (it checks inputs)."""
    assert_imports_without("MedLoRALib.report.sr", forbidden=("torch", "timm", "peft", "highdicom"))
    # where highdicom is missing, writing says so and names the way out (no ImportError traceback)
    assert_imports_without("MedLoRALib.report.sr", forbidden=("torch", "highdicom"), then="\n".join([
        "sys.modules['highdicom'] = None  # as in 3D Slicer 5.4-5.10",
        "from MedLoRALib.report.sr import SRError, SeriesRef, sr_available, write_score_sr",
        "from MedLoRALib.image import StudyIds",
        "assert not sr_available()",
        "try:",
        "    write_score_sr('x.dcm', SeriesRef(StudyIds(series_uid='1.2')), [], [], {})",
        "except SRError as exc:",
        "    assert 'highdicom' in str(exc) and 'python -m MedLoRALib.report' in str(exc), exc",
        "else:",
        "    raise AssertionError('no SRError')",
        "del sys.modules['highdicom']"]))


def test_a_single_component_patient_name_is_copied_without_highdicoms_warning(tmp_path):
    """Anonymised series often name the patient ``SYN-0001`` (no caret): highdicom warns on every SR about
    the user's data. The SR copies the name as it is; only that warning is silenced."""
    import warnings

    from MedLoRALib.report.sr import _quiet_highdicom
    from MedLoRALib.synthetic import make_phantom
    from MedLoRALib.synthetic.series import write_dicom_series

    image, nodules = make_phantom(seed=3, case_id="SYN-0001")
    nodules = nodules[:1]
    ct = load_ct(write_dicom_series(image, tmp_path / "series", patient_id="SYN-0001"))
    manifest = AdapterManifest(name="a", backbone="medlora_tiny", backbone_sha256="ab" * 32, lora={"rank": 4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = write_score_sr(tmp_path / "sr.dcm", ct, nodules, [{"probability": 0.25, "label": "benign"}], manifest)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert str(pydicom.dcmread(out).PatientName) == "SYN-0001"  # copied verbatim, no caret added
    with warnings.catch_warnings(record=True) as caught:  # any other highdicom warning still shows
        warnings.simplefilter("always")
        with _quiet_highdicom():
            warnings.warn_explicit('The string "X" is unlikely to represent the intended person name', UserWarning,
                                   "base.py", 1, module="highdicom.base")
            warnings.warn_explicit("another highdicom warning", UserWarning, "base.py", 2, module="highdicom.base")
    assert [str(w.message) for w in caught] == ["another highdicom warning"]
