"""``medlora web`` driven click by click in headless Chromium (Debian's ``chromium``, via Playwright).

The app runs as ``medlora web`` in its own process: in ``.venv-web`` (trame-slicer pins
slicer-core 5.11, see docs/web.md) or wherever ``MEDLORA_WEB_PYTHON`` points; its scoring
engine runs in this interpreter (torch). Nothing is mocked: the page loads the real
LIDC-IDRI-0001 series, a click in Slicer's axial view places the point, the engine scores it.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MedLoRALib.patches import PatchSpec

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MEDLORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SPEC = PatchSpec(views="axial", fov_mm=40.0, pixels=32)
MALIGNANT_RGB, BENIGN_RGB = (0.90, 0.10, 0.10), (0.10, 0.80, 0.20)  # slicer/results.py
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _web_python() -> str | None:
    """An interpreter with trame-slicer: $MEDLORA_WEB_PYTHON, else the Makefile's .venv-web."""
    for candidate in (os.environ.get("MEDLORA_WEB_PYTHON"), str(REPO / ".venv-web" / "bin" / "python")):
        if candidate and Path(candidate).exists() and subprocess.run(
                [candidate, "-c", "import trame_slicer"], capture_output=True).returncode == 0:
            return candidate
    return None


WEB_PYTHON = _web_python()
if not Path(CHROMIUM).exists():
    pytest.skip(f"Chromium not found at {CHROMIUM} (Debian package chromium; `make system-deps` installs it)",
                allow_module_level=True)
if WEB_PYTHON is None:
    pytest.skip("no Python with trame-slicer (.venv-web, made by `make test`, or $MEDLORA_WEB_PYTHON)",
                allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is part of medlora[test]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebServer:
    """``medlora web`` as a user starts it; ``url`` is what it printed."""

    def __init__(self, data_root: Path, store: Path, work: Path, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self.log = work / "server.log"
        self.proc = subprocess.Popen(
            [WEB_PYTHON, "-m", "MedLoRALib", "web", "--data-root", str(data_root), "--store", str(store),
             "--port", str(_free_port()), "--engine-python", sys.executable, "--device", "cpu",
             "--work-dir", str(work / "training"), *extra],
            stdout=subprocess.PIPE, stderr=open(self.log, "wb"), env=env, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if "open http" not in line:
            self.stop()
            raise AssertionError(f"medlora web did not start: {line!r}\n{self.log.read_text()[-3000:]}")
        self.url = line.split("open ", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def store(tiny_adapter, tmp_path_factory) -> Path:
    from MedLoRALib.adapters.store import AdapterStore

    root = tmp_path_factory.mktemp("web-store")
    AdapterStore(root).import_(tiny_adapter("site-a", SPEC, seed=0, head_bias=1.5))  # scores high: malignant
    return root


@pytest.fixture(scope="module")
def server(shared_data, store, tmp_path_factory):
    work = tmp_path_factory.mktemp("web")
    web = WebServer(shared_data, store, work, "--max-upload-mb", "0.1")
    yield web
    web.stop()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    with playwright.sync_playwright() as p:
        profile = tmp_path_factory.mktemp("chromium-profile")
        context = p.chromium.launch_persistent_context(  # a fresh --user-data-dir
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 900},
            device_scale_factor=1)
        tab = context.new_page()
        tab.goto(server.url)
        tab.wait_for_selector("#open-path", timeout=60_000)
        yield tab
        context.close()


def _wait(page, condition: str, timeout_s: float = 120.0, arg=None):
    return page.wait_for_function(condition, arg=arg, timeout=timeout_s * 1000)


def _error_text(page, expected: str) -> str:
    """The page's error message once it contains ``expected`` (or whatever it says after 30 s)."""
    try:
        _wait(page, "s => { const e = document.querySelector('#error');"
                    " return e && e.offsetParent && e.innerText.includes(s); }", 30, expected)
    except playwright.TimeoutError:
        pass
    return page.inner_text("#error") if page.locator("#error").is_visible() else ""


def _open(page, relative: str) -> None:
    page.fill("#open-path", relative)
    page.click("#open-btn")


def _geometry(page) -> dict:
    return json.loads(page.eval_on_selector("#view-geometry", "e => e.textContent"))


def _pixel_of(page, point_ras) -> tuple[float, float]:
    """Where a world RAS point lies on the page, through the axial view's XY→RAS map (Slicer's)."""
    red = _geometry(page)["Red"]
    xy = np.linalg.solve(np.array(red["xy_to_ras"]), np.append(np.asarray(point_ras, float), 1.0))
    box = page.locator("#views .remote-controlled-area").first.bounding_box()
    width, height = red["size"]
    return box["x"] + xy[0] * box["width"] / width, box["y"] + (height - xy[1]) * box["height"] / height


def _colour_mask(pixels: np.ndarray, rgb, tolerance: int = 45) -> np.ndarray:
    return np.all(np.abs(pixels[..., :3].astype(float) - np.array(rgb) * 255) < tolerance, axis=-1)


def test_click_on_the_lidc_nodule_scores_it_as_the_cli_does_and_draws_it_in_its_score_colour(
        page, server, shared_data, lidc_0001, store, tmp_path):
    from PIL import Image

    from MedLoRALib.annotations import load_nodules
    from MedLoRALib.cli import main as cli_main
    from MedLoRALib.ctio import load_ct
    from MedLoRALib.geometry import lps_to_ras

    _open(page, str(lidc_0001.relative_to(shared_data)))
    _wait(page, "() => document.querySelector('#status').innerText.startsWith('opened')")
    [nodule] = load_nodules(next(lidc_0001.glob("*.xml")), image=load_ct(lidc_0001))
    nodule_ras = lps_to_ras(np.asarray(nodule.centre_lps))
    page.fill("#centre-on", " ".join(f"{v:.3f}" for v in nodule_ras))
    page.click("#centre-btn")
    _wait(page, """s => { const g = JSON.parse(document.querySelector('#view-geometry').textContent).Red;
                          return g && Math.abs(g.xy_to_ras[2][3] - s) < 0.5 && g.size[0] > 100; }""",
          60, float(nodule_ras[2]))
    x, y = _pixel_of(page, nodule_ras)
    page.mouse.click(x, y)
    _wait(page, "() => document.querySelectorAll('#points tr.point-row').length === 1", 30)
    page.click("#score-btn")
    _wait(page, "() => { const p = document.querySelector('#results .probability'); return p && p.innerText; }", 240)
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

    page.locator("#results tr.result-row").first.click()
    _wait(page, "() => document.querySelector('#thumbnail').src.startsWith('data:image/png')", 30)


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
