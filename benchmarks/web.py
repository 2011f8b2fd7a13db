"""``medlora web`` in headless Chromium vs the same work through the command line, on LIDC-IDRI-0001.

Times, on the real LIDC-IDRI-0001 series and its XML nodule:

* ``page_open_to_first_slice``: press Open (path under the data root) → the axial view shows the
  CT (the status says opened and the view's image is streamed);
* ``click_to_probability_cold``: click the nodule in the axial view → its probability in the table,
  the first time (engine start and adapter load included);
* ``click_to_probability_warm``: the same for a second click beside it (warm engine);
* ``cli_score``: ``medlora score`` on the same point in a new process (CT load, engine, score).

Adapter: the tests' tiny backbone (random init), axial 32 px patches, test-time augmentation on.
The app runs in ``.venv-web`` (or ``$MEDLORA_WEB_PYTHON``); the engine and the CLI in this Python.
``--screenshot PNG`` also saves the page after the warm scoring (the README's picture). Prints JSON.

    HF_HUB_OFFLINE=1 MEDLORA_WEB_PYTHON=.venv-web/bin/python .venv/bin/python benchmarks/web.py [--screenshot docs/web.png]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--screenshot", type=Path, help="save the page after scoring as this PNG")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "Testing"))
    import numpy as np
    from helpers import save_tiny_adapter

    from MedLoRALib.adapters.store import AdapterStore
    from MedLoRALib.annotations import load_nodules
    from MedLoRALib.ctio import load_ct
    from MedLoRALib.geometry import lps_to_ras
    from MedLoRALib.patches import PatchSpec
    from MedLoRALib.web import browser

    python = browser.web_python()
    if python is None:
        raise SystemExit("no Python with trame-slicer: run `make test` once (it makes .venv-web) or set "
                         "MEDLORA_WEB_PYTHON")
    series = next(p.parent for p in sorted((args.data_root / "lidc" / "LIDC-IDRI-0001").rglob("*.dcm")))
    [nodule] = load_nodules(next(series.glob("*.xml")), image=load_ct(series))
    nodule_ras = lps_to_ras(np.asarray(nodule.centre_lps))
    work = Path(tempfile.mkdtemp(prefix="medlora-web-bench-"))
    adapter = save_tiny_adapter(work / "adapters", "site-a", PatchSpec(views="axial", fov_mm=40.0, pixels=32),
                                head_bias=1.5)[0]
    AdapterStore(work / "store").import_(adapter)
    found: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}
    start = time.perf_counter()
    server = browser.WebServer(python, args.data_root, work / "store", work, sys.executable, "--device", "cpu")
    found["server_start_s"] = time.perf_counter() - start
    try:
        with browser.chromium_page(server.url, work / "profile") as page:
            start = time.perf_counter()
            browser.open_study(page, str(series.relative_to(args.data_root)))
            browser.wait_for(page, "() => { const i = document.querySelector('#views img'); "
                                   "return i && i.complete && i.naturalWidth > 100; }")
            found["page_open_to_first_slice_s"] = time.perf_counter() - start
            browser.centre_views(page, nodule_ras)
            start = time.perf_counter()
            browser.click_and_score(page, nodule_ras)
            found["click_to_probability_cold_s"] = time.perf_counter() - start
            start = time.perf_counter()
            browser.click_and_score(page, nodule_ras + np.array([3.0, 0.0, 0.0]), points_before=1)
            found["click_to_probability_warm_s"] = time.perf_counter() - start
            cell = page.locator("#results .probability").first
            found["probability_page"] = float(cell.inner_text())
            placed_ras = [float(v) for v in cell.get_attribute("data-ras").split()]
            if args.screenshot:
                page.locator("#results tr.result-row").first.click()
                browser.wait_for(page, "() => document.querySelector('#thumbnail').src.startsWith('data:')", 60)
                time.sleep(1.0)
                page.screenshot(path=str(args.screenshot))
    finally:
        server.stop()
    points = work / "point.csv"
    with open(points, "w", newline="") as handle:
        csv.writer(handle).writerows([["x", "y", "z", "coordinate_system"], [*placed_ras, "RAS"]])
    start = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "MedLoRALib", "score", "--volume", str(series), "--points",
                          str(points), "--adapter", "site-a", "--store", str(work / "store"), "--device", "cpu"],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    found["cli_score_s"] = time.perf_counter() - start
    found["probability_cli"] = float(next(csv.DictReader(cli.stdout.splitlines()))["probability"])
    print(json.dumps({k: round(v, 3) if k.endswith("_s") else v for k, v in found.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
