"""Driving ``medlora web`` from a real browser: the tests, the benchmark and the README's screenshot.

Starts the app as a user would (``python -m MedLoRALib web``, reading the address it prints)
and Debian's Chromium through Playwright with the system executable (no browser download).
Page contract: the element ids in ``page.py`` and the views' geometry in ``#view-geometry``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CHROMIUM = os.environ.get("MEDLORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[2]


def web_python() -> str | None:
    """An interpreter with trame-slicer: ``$MEDLORA_WEB_PYTHON``, else the Makefile's ``.venv-web``."""
    for candidate in (os.environ.get("MEDLORA_WEB_PYTHON"), str(REPO / ".venv-web" / "bin" / "python")):
        if candidate and Path(candidate).exists() and subprocess.run(
                [candidate, "-c", "import trame_slicer"], capture_output=True).returncode == 0:
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebServer:
    """``medlora web`` in its own process (``python``: one with trame-slicer); ``url`` is what it printed."""

    def __init__(self, python: str, data_root: Path, store: Path, work: Path, engine_python: str,
                 *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        self.log = Path(work) / "server.log"
        self.proc = subprocess.Popen(
            [python, "-m", "MedLoRALib", "web", "--data-root", str(data_root), "--store", str(store),
             "--port", str(free_port()), "--engine-python", engine_python, "--work-dir", str(Path(work) / "runs"),
             *extra], stdout=subprocess.PIPE, stderr=open(self.log, "wb"), env=env, text=True,
            start_new_session=True)
        line = self.proc.stdout.readline()
        if "open http" not in line:
            self.stop()
            raise RuntimeError(f"medlora web did not start: {line!r}\n{self.log.read_text()[-3000:]}")
        self.url = line.split("open ", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def chromium_page(url: str, profile: Path, playwright=None, size: tuple[int, int] = (1400, 900)):
    """A page of headless Chromium (a fresh profile folder) open at ``url``, once the controls are there.

    ``playwright``: a started ``sync_playwright()`` to share (one per thread may run); else one of its own.
    """
    if playwright is None:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as own, chromium_page(url, profile, own, size) as page:
            yield page
        return
    context = playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, args=CHROMIUM_FLAGS, viewport={"width": size[0], "height": size[1]},
        device_scale_factor=1)
    try:
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("#open-path", timeout=120_000)
        yield page
    finally:
        context.close()


def wait_for(page, condition: str, timeout_s: float = 120.0, arg=None):
    return page.wait_for_function(condition, arg=arg, timeout=timeout_s * 1000)


def open_study(page, relative: str, timeout_s: float = 120.0) -> None:
    """Type a path under the data root, press Open, wait for the study to be shown."""
    page.fill("#open-path", relative)
    page.click("#open-btn")
    wait_for(page, "() => document.querySelector('#status').innerText.startsWith('opened')", timeout_s)


def centre_views(page, point_ras) -> None:
    """Centre the slice views on a world RAS point and wait until the axial view passes through it."""
    page.fill("#centre-on", " ".join(f"{v:.3f}" for v in point_ras))
    page.click("#centre-btn")
    wait_for(page, """s => { const g = JSON.parse(document.querySelector('#view-geometry').textContent).Red;
                             return g && Math.abs(g.xy_to_ras[2][3] - s) < 0.5 && g.size[0] > 100; }""",
             60, float(point_ras[2]))


def pixel_of(page, point_ras) -> tuple[float, float]:
    """Where a world RAS point lies on the page, through the axial view's XY→RAS map (Slicer's)."""
    red = json.loads(page.eval_on_selector("#view-geometry", "e => e.textContent"))["Red"]
    xy = np.linalg.solve(np.array(red["xy_to_ras"]), np.append(np.asarray(point_ras, float), 1.0))
    box = page.locator("#views .remote-controlled-area").first.bounding_box()
    width, height = red["size"]
    return box["x"] + xy[0] * box["width"] / width, box["y"] + (height - xy[1]) * box["height"] / height


def click_and_score(page, point_ras, points_before: int = 0, timeout_s: float = 240.0) -> tuple[float, float]:
    """Click the axial view at a point (placing it), press Score, wait for the table; returns the pixel."""
    x, y = pixel_of(page, point_ras)
    page.mouse.click(x, y)
    wait_for(page, f"() => document.querySelectorAll('#points tr.point-row').length === {points_before + 1}", 30)
    page.click("#score-btn")
    wait_for(page, f"""() => {{ const p = document.querySelectorAll('#results .probability');
                               return p.length === {points_before + 1} && [...p].every(c => c.innerText); }}""",
             timeout_s)
    return x, y
