"""``medlora web`` driven click by click in headless Chromium (Debian's ``chromium``, via Playwright).

The app runs as ``medlora web`` in its own process: in ``.venv-web`` (trame-slicer pins
slicer-core 5.11, see docs/web.md) or wherever ``MEDLORA_WEB_PYTHON`` points; its scoring
engine runs in this interpreter (torch). Nothing is mocked: the page loads the real
LIDC-IDRI-0001 series, a click in Slicer's axial view places the point, the engine scores it.
"""

from __future__ import annotations

import base64
import csv
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MedLoRALib.patches import PatchSpec
from MedLoRALib.web import browser

SPEC = PatchSpec(views="axial", fov_mm=40.0, pixels=32)
MALIGNANT_RGB, BENIGN_RGB = (0.90, 0.10, 0.10), (0.10, 0.80, 0.20)  # slicer/results.py
pytestmark = [pytest.mark.browser, pytest.mark.slow]

WEB_PYTHON = browser.web_python()
if not Path(browser.CHROMIUM).exists():
    pytest.skip(f"Chromium not found at {browser.CHROMIUM} (Debian package chromium; `make system-deps` installs "
                "it)", allow_module_level=True)
if WEB_PYTHON is None:
    pytest.skip("no Python with trame-slicer (.venv-web, made by `make test`, or $MEDLORA_WEB_PYTHON)",
                allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is part of medlora[test]")


# The first probability in the results table, or "restart" while the page shows the engine's
# "restarted on the next request" error.
NEW_PROBABILITY_OR_RESTART_ERROR = """() => {
    const p = document.querySelector('#results .probability');
    if (p && p.innerText) return p.innerText;
    const e = document.querySelector('#error');
    return e && e.offsetParent !== null && e.innerText.includes('restarted on the next request') ? 'restart' : null;
}"""
ENGINE_STOPPED_STATUS = "scoring stopped: the scoring engine stopped. Press Score again to restart it."
FIRST_PROBABILITY = "() => { const p = document.querySelector('#results .probability'); return p && p.innerText; }"


@pytest.fixture(scope="module")
def store(tiny_adapter, tmp_path_factory) -> Path:
    from MedLoRALib.adapters.store import AdapterStore

    root = tmp_path_factory.mktemp("web-store")
    AdapterStore(root).import_(tiny_adapter("site-a", SPEC, seed=0, head_bias=1.5))  # scores high: malignant
    return root


@pytest.fixture(scope="module")
def server(shared_data, store, tmp_path_factory):
    web = browser.WebServer(WEB_PYTHON, shared_data, store, tmp_path_factory.mktemp("web"), sys.executable,
                            "--max-upload-mb", "0.1", "--device", "cpu")
    yield web
    web.stop()


@pytest.fixture(scope="module")
def pw():
    """One Playwright for the module (a second one cannot start while the first runs)."""
    with playwright.sync_playwright() as instance:
        yield instance


@pytest.fixture(scope="module")
def page(server, pw, tmp_path_factory):
    with browser.chromium_page(server.url, tmp_path_factory.mktemp("chromium-profile"), pw) as tab:
        yield tab


def _error_text(page, expected: str) -> str:
    """The page's error message once it contains ``expected`` (or whatever it says after 30 s)."""
    try:
        browser.wait_for(page, "s => { const e = document.querySelector('#error');"
                               " return e && e.offsetParent && e.innerText.includes(s); }", 30, expected)
    except playwright.TimeoutError:
        pass
    return page.inner_text("#error") if page.locator("#error").is_visible() else ""


def _engine(server):
    """The web app's live ``medlora serve`` process."""
    import psutil

    [engine] = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE and "serve" in p.cmdline()]
    return engine


def _colour_mask(pixels: np.ndarray, rgb, tolerance: int = 45) -> np.ndarray:
    return np.all(np.abs(pixels[..., :3].astype(float) - np.array(rgb) * 255) < tolerance, axis=-1)


def test_click_on_the_lidc_nodule_scores_it_as_the_cli_does_and_draws_it_in_its_score_colour(
        page, server, shared_data, lidc_0001, store, tmp_path):
    from PIL import Image

    from MedLoRALib.annotations import load_nodules
    from MedLoRALib.cli import main as cli_main
    from MedLoRALib.ctio import load_ct
    from MedLoRALib.geometry import lps_to_ras

    browser.open_study(page, str(lidc_0001.relative_to(shared_data)))
    [nodule] = load_nodules(next(lidc_0001.glob("*.xml")), image=load_ct(lidc_0001))
    nodule_ras = lps_to_ras(np.asarray(nodule.centre_lps))
    browser.centre_views(page, nodule_ras)
    x, y = browser.click_and_score(page, nodule_ras)
    cell = page.locator("#results .probability").first
    probability = float(cell.inner_text())
    placed_ras = [float(v) for v in cell.get_attribute("data-ras").split()]
    assert np.linalg.norm(np.array(placed_ras[:2]) - nodule_ras[:2]) < 1.5  # the click landed on the nodule
    assert abs(placed_ras[2] - nodule_ras[2]) < 1.5
    assert page.inner_text("#results .label") == "malignant"
    assert "site-a" in page.inner_text("#results")

    points = tmp_path / "point.csv"
    with open(points, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", "z", "coordinate_system", "nodule_id"])
        writer.writerow([*(f"{v:.6f}" for v in placed_ras), "RAS", "clicked"])
    out = tmp_path / "cli.csv"  # `medlora score` itself, in this process (torch is loaded here already)
    assert cli_main(["score", "--volume", str(lidc_0001), "--points", str(points), "--adapter", "site-a",
                     "--store", str(store), "--device", "cpu", "--out", str(out)]) == 0
    [row] = list(csv.DictReader(out.open()))
    assert abs(float(row["probability"]) - probability) < 1e-5
    assert page.inner_text("#results .tta") == row["tta"] == "d8"  # the adapter records no set: all eight

    time.sleep(1.0)  # the view redraws with the point's new colour (the RCA stream is ~30 fps)
    shot = tmp_path / "scored.png"
    page.screenshot(path=str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    near = (slice(int(y) - 10, int(y) + 11), slice(int(x) - 10, int(x) + 11))
    glyph = _colour_mask(pixels, MALIGNANT_RGB)[near]
    assert glyph.sum() >= 10, "no marker in the malignant colour at the clicked pixel"
    assert _colour_mask(pixels, BENIGN_RGB)[near].sum() == 0
    rows, cols = np.nonzero(glyph)
    assert abs(cols.mean() - 10) < 4 and abs(rows.mean() - 10) < 4

    import psutil  # a crashed engine is started again by the next request; the study stays loaded

    engine = _engine(server)
    engine.kill()
    deadline = time.monotonic() + 10  # it stays a zombie until the app notices (not our child to reap)
    while engine.is_running() and engine.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.1)
    before = page.locator("#results .probability").first.element_handle()
    page.click("#score-btn")  # the old row leaves the table first: only then is a probability the new one
    browser.wait_for(page, "old => !old.isConnected", 60, arg=before)
    # Found dead before the request, the engine is restarted at once; found dead while answering, the page
    # says so and the next request restarts it (as in Slicer). Either way the same probability follows.
    outcome = browser.wait_for(page, NEW_PROBABILITY_OR_RESTART_ERROR, 240).json_value()
    if outcome == "restart":  # the status line says what happened and what to do, not "scoring…"
        browser.wait_for(page, "s => document.querySelector('#status').innerText === s", 10, ENGINE_STOPPED_STATUS)
        page.click("#score-btn")
        outcome = browser.wait_for(page, FIRST_PROBABILITY, 240).json_value()
    rescored = outcome
    assert abs(float(rescored) - probability) < 1e-6
    assert page.inner_text("#status").startswith("1 nodules scored")

    engine = _engine(server)  # found dead while it answers, for certain: stopped, asked, then killed
    engine.suspend()
    before = page.locator("#results .probability").first.element_handle()
    page.click("#score-btn")  # the row leaves the table in the action that sends the request
    browser.wait_for(page, "old => !old.isConnected", 60, arg=before)
    engine.kill()
    browser.wait_for(page, "s => document.querySelector('#status').innerText === s", 60, ENGINE_STOPPED_STATUS)
    assert "stopped while answering 'score'" in page.inner_text("#error")
    page.click("#score-btn")  # restarts the engine: the same probability, the study still open
    assert abs(float(browser.wait_for(page, FIRST_PROBABILITY, 240).json_value()) - probability) < 1e-6

    page.locator("#results tr.result-row").first.click()
    browser.wait_for(page, "() => document.querySelector('#thumbnail').src.startsWith('data:image/png')", 30)

    xml = next(lidc_0001.glob("*.xml"))  # the same nodule imported from the LIDC XML: same place in RAS
    page.fill("#points-path", str(xml.relative_to(shared_data)))
    page.click("#import-btn")
    browser.wait_for(page, "() => document.querySelectorAll('#points tr.point-row').length === 2", 30)
    imported = page.locator("#points tr.point-row").nth(1).locator("td").nth(1).inner_text()
    assert np.allclose([float(v) for v in imported.split(",")], nodule_ras, atol=0.006)
    page.locator("#points tr.point-row").nth(1).locator(".delete-point").click()
    browser.wait_for(page, "() => document.querySelectorAll('#points tr.point-row').length === 1", 30)


def _open(page, relative: str) -> None:
    page.fill("#open-path", relative)
    page.click("#open-btn")


def test_a_path_outside_the_data_root_is_refused_in_the_page(page):
    _open(page, "../../etc")
    assert "'..' is not allowed" in _error_text(page, "'..'")
    _open(page, "/etc/passwd")
    assert "outside the data root" in _error_text(page, "outside")


def test_a_file_that_is_not_a_ct_gets_its_cause_in_the_page(page, shared_data):
    _open(page, "README.md")
    message = _error_text(page, "README.md")
    assert "README.md is neither DICOM nor a supported volume file" in message and "Traceback" not in message


def test_an_uploaded_file_that_is_not_a_ct_gets_its_cause_in_the_page(page, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a CT")
    page.set_input_files("#upload", str(text))
    assert "notes.txt is neither DICOM nor a supported volume file" in _error_text(page, "notes.txt")


def test_an_upload_over_the_cap_is_refused_in_the_page(page, tmp_path):
    big = tmp_path / "big.nrrd"
    big.write_bytes(b"\0" * 200_000)  # the server runs with --max-upload-mb 0.1
    page.set_input_files("#upload", str(big))
    assert "more than the limit of 0.1 MiB" in _error_text(page, "more than the limit")


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    """Three synthetic studies (three patients) with labelled nodules, one points CSV per study."""
    from MedLoRALib.cli import main as cli_main

    root = tmp_path_factory.mktemp("phantoms")
    assert cli_main(["phantom", "--out", str(root / "cohort"), "--cases", "3", "--nodules", "4",
                     "--size", "160", "160", "64"]) == 0
    rows = list(csv.DictReader((root / "cohort" / "manifest.csv").open()))
    for image in {row["image"] for row in rows}:
        with open(root / "cohort" / f"{Path(image).stem}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["x", "y", "z", "coordinate_system", "label", "nodule_id"])
            writer.writeheader()
            writer.writerows({k: row[k] for k in writer.fieldnames} for row in rows if row["image"] == image)
    return root


def _trainers(work: Path) -> list:
    """Live ``medlora train`` processes writing under ``work`` (the app's --work-dir)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and "train" in cmdline and str(work) in " ".join(cmdline):
            found.append(proc)
    return found


def test_train_from_the_page_to_100_percent_cancel_a_second_run_then_batch_score_the_folder(
        phantom_root, pw, tmp_path):
    from MedLoRALib.adapters.store import AdapterStore

    work = tmp_path / "web"
    work.mkdir()
    web = browser.WebServer(WEB_PYTHON, phantom_root, tmp_path / "store", work, sys.executable, "--device", "cpu")
    try:
        with browser.chromium_page(web.url, tmp_path / "profile", pw) as page:
            for case in ("SYN-0001", "SYN-0002", "SYN-0003"):
                browser.open_study(page, f"cohort/{case}.nrrd")
                page.fill("#points-path", f"cohort/{case}.csv")
                page.click("#import-btn")
                browser.wait_for(page, "() => document.querySelectorAll('#points tr.point-row').length === 4", 60)
            page.click("#tab-train")
            assert page.inner_text("#labelled").startswith("6 benign, 6 malignant points labelled in 3 open studies")
            page.select_option("#train-preset", "tiny")
            page.fill("#train-name", "web-tiny")
            page.fill("#train-epochs", "1")
            page.click("#train-start")
            browser.wait_for(page, "() => document.querySelector('#train-progress').innerText === '100%'", 300)
            assert page.locator("#train-curve polyline#loss-curve").count() == 1
            page.click("#tab-score")
            browser.wait_for(page, "() => document.querySelector('#adapter-names').innerText.includes('web-tiny')", 30)
            assert "web-tiny" in AdapterStore(tmp_path / "store")

            page.click("#tab-train")
            page.fill("#train-name", "web-cancel")
            page.fill("#train-epochs", "200")
            page.click("#train-start")
            browser.wait_for(page, "() => /^(training on|epoch)/.test(document.querySelector('#train-status').innerText)",
                             300)
            assert _trainers(work), "no trainer process found while the page says it trains"
            page.click("#train-cancel")
            cancelled = time.monotonic()
            while _trainers(work) and time.monotonic() - cancelled < 30:
                time.sleep(0.2)
            took = time.monotonic() - cancelled
            assert not _trainers(work) and took < 10, f"trainer still running {took:.1f} s after Cancel"
            browser.wait_for(page, "() => !document.querySelector('#train-status').innerText.startsWith('stopping')",
                             30)
            page.click("#tab-score")
            assert "web-cancel" not in page.inner_text("#adapter-names")

            page.set_input_files("#upload", str(phantom_root / "cohort" / "SYN-0001.nrrd"))  # open, not in the batch
            browser.wait_for(page, "() => document.querySelector('#status').innerText.startsWith('opened SYN-0001 (2)')",
                             60)
            page.click("#tab-batch")  # every study of the folder, with the adapter just trained
            page.fill("#batch-folder", "cohort")
            page.click("#batch-start")
            browser.wait_for(page, "() => document.querySelector('#batch-status').innerText.startsWith('100%')", 240)
            assert page.locator("#batch-results tr.batch-row").count() == 12
            studies = {cell.inner_text() for cell in page.locator("#batch-results tr.batch-row td:first-child").all()}
            assert studies == {"SYN-0001", "SYN-0002", "SYN-0003"}  # the open studies, not second copies
            href = page.get_attribute("#batch-csv", "href")
            rows = list(csv.DictReader(base64.b64decode(href.split(",", 1)[1]).decode().splitlines()))
            assert len(rows) == 12 and all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)
            assert {r["adapter"] for r in rows} == {"web-tiny"}
    finally:
        web.stop()


def test_another_host_needs_the_printed_token(shared_data, store, pw, tmp_path):
    """Bound beyond 127.0.0.1, the page opens only from the printed address (token), websocket included."""
    web = browser.WebServer(WEB_PYTHON, shared_data, store, tmp_path, sys.executable, "--host", "127.0.0.2")
    try:
        assert "?token=" in web.url and web.url.startswith("http://127.0.0.2:")
        bare = web.url.split("?", 1)[0]
        with browser.chromium_page(web.url, tmp_path / "with-token", pw) as page:  # the page and its websocket work
            _open(page, "../x")
            assert "'..' is not allowed" in _error_text(page, "'..'")
        context = pw.chromium.launch_persistent_context(str(tmp_path / "without"), executable_path=browser.CHROMIUM,
                                                        args=browser.CHROMIUM_FLAGS)
        try:
            response = context.new_page().goto(bare)
            assert response.status == 403 and "token" in response.text()
        finally:
            context.close()
    finally:
        web.stop()
