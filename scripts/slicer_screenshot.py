#!/usr/bin/env python
"""Make docs/screenshot.png: LIDC-IDRI-0001 in a Slicer slice view, its nodule scored through the engine.

    HF_HUB_OFFLINE=1 python scripts/slicer_screenshot.py --lidc ../shared/data/lidc/LIDC-IDRI-0001

What it does, with the same code the Slicer module runs (slicer-core, no Qt):
1. trains (once; reused from --work) a small LoRA adapter on a synthetic phantom cohort with the
   tiny backbone that MedLoRA pre-trained on synthetic CT (``medlora phantom`` + ``medlora train``);
2. loads the real CT and the readers' consensus nodule from its LIDC XML into an MRML scene;
3. scores the point through a real ``medlora serve`` engine, which colours and labels it;
4. renders the slice view with Slicer's displayable managers (under Xvfb) to PNG.

The adapter is named ``phantom-demo-tiny`` and the point label shows it beside the probability:
a number from a phantom-trained tiny model, not a clinical result.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "phantom-demo-tiny"
WEIGHTS = ROOT / "MedLoRALib" / "assets" / "medlora_tiny_synthct.safetensors"


def medlora(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "MedLoRALib", *args], check=True)


def train_adapter(work: Path, weights: Path, cases: int, epochs: int) -> Path:
    adapter = work / ADAPTER
    if (adapter / "manifest.json").is_file():
        return adapter
    cohort = work / "cohort"
    if not (cohort / "manifest.csv").is_file():
        medlora("phantom", "--out", str(cohort), "--cases", str(cases))
    medlora("train", "--manifest", str(cohort / "manifest.csv"), "--out", str(adapter), "--name", ADAPTER,
            "--backbone", "medlora_tiny", "--weights", str(weights), "--views", "multiview9", "--pixels", "64",
            "--epochs", str(epochs), "--batch-size", "16", "--progress", "none", "--threads", "2",
            *(["--resume"] if (work / f"{ADAPTER}.checkpoint").is_dir() else []))
    return adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lidc", type=Path, default=ROOT.parent / "shared" / "data" / "lidc" / "LIDC-IDRI-0001",
                        help="the LIDC-IDRI-0001 case folder (DICOM series and reader XML inside)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medlora-screenshot"),
                        help="cohort and adapter (reused when present)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="the tiny backbone's weights")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    args = parser.parse_args(argv)

    from MedLoRALib.annotations import load_nodules
    from MedLoRALib.ctio import load_ct
    from MedLoRALib.geometry import lps_to_ras
    from MedLoRALib.slicer import mrml, render
    from MedLoRALib.slicer.engine_client import EngineConfig
    from MedLoRALib.slicer.scoring import ScoringSession

    adapter = train_adapter(args.work, args.weights, args.cases, args.epochs)
    series = next(p.parent for p in sorted(args.lidc.rglob("*.dcm")))
    image = load_ct(series)
    nodules = load_nodules(next(series.glob("*.xml")), image=image)
    for number, nodule in enumerate(nodules, 1):  # short names leave room for the score beside the point
        nodule.nodule_id = f"n{number} ({nodule.reader_count} readers)"

    headless = mrml.create_headless_scene()
    volume = mrml.add_volume_node(headless.scene, image, name=args.lidc.name)
    markups = mrml.add_markups_node(headless.scene, nodules, name="nodules")
    logic = ScoringSession(headless.scene, engine_config=EngineConfig(python=sys.executable))
    try:
        logic.attach_adapter(str(adapter), name=ADAPTER, weights=str(args.weights))
        _, rows = logic.score(volume, markups)
    finally:
        logic.close()
    for row in rows:
        print(f"{row.nodule}: probability {row.probability:.3f} ({row.label_name}) with {row.adapter} "
              f"{row.adapter_version}{' RANDOM-INIT' if row.random_init else ''}")

    # The whole axial slice through the first nodule: body centre in R and A, the nodule's S.
    lo, hi = (lps_to_ras(corner) for corner in image.geometry.extent_lps)
    nodule_ras = lps_to_ras(nodules[0].centre_lps)
    centre_ras = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, nodule_ras[2]])
    with render.virtual_display():
        view = render.render_slice_view(volume, markups, args.out, app_logic=headless.app_logic,
                                        centre_ras=centre_ras, size=(800, 640), field_of_view_mm=425.0)
    print(f"wrote {view.path}; points at {view.points_px}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
