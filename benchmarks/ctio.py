"""CT loading and phantom generation speed, side by side with plain SimpleITK.

Prints one JSON object. ``load_ct`` reads every header with pydicom, runs its own geometry checks
and then lets SimpleITK decode the pixels; the question is how much that costs over SimpleITK's
own series reading (GDCM file-name scan + ImageSeriesReader). Times are medians of ``--repeats``
runs, as wall clock and as process CPU time (the latter is what the work costs on an idle core
when the shared machine is busy).

    python benchmarks/ctio.py [--repeats 3] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MedLoRALib.ctio import load_ct, save_volume
from MedLoRALib.geometry import Geometry
from MedLoRALib.image import CTImage
from MedLoRALib.synthetic import PhantomConfig, make_phantom, oblique_direction, write_cohort, write_dicom_series


def timed(fn, repeats: int) -> dict:
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_s": round(float(np.median(walls)), 4), "cpu_s": round(float(np.median(cpus)), 4)}


def plain_simpleitk(folder: Path) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def compare_loading(folder: Path, repeats: int) -> dict:
    """Interleaved runs, so drifting load from other processes hits both readers alike."""
    runs = [(timed(lambda: load_ct(folder), 1), timed(lambda: plain_simpleitk(folder), 1)) for _ in range(repeats)]
    ours, theirs = ({key: round(float(np.median([r[n][key] for r in runs])), 4) for key in ("wall_s", "cpu_s")}
                    for n in (0, 1))
    return {"slices": load_ct(folder).geometry.size[2], "load_ct": ours, "simpleitk": theirs,
            "ratio_wall": round(ours["wall_s"] / theirs["wall_s"], 2),
            "ratio_cpu": round(ours["cpu_s"] / theirs["cpu_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    result: dict = {}
    lidc = next((p.parent for p in sorted((args.data / "lidc" / "LIDC-IDRI-0001").rglob("*.dcm"))), None)
    if lidc is not None:
        result["lidc_0001_133_slices"] = compare_loading(lidc, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        if lidc is not None:  # a 300-slice series: the real slices repeated along z
            real = load_ct(lidc)
            voxels = np.concatenate([real.voxels_hu] * 3)[:300]
            g = real.geometry
            tall = CTImage(voxels, Geometry(size=(g.size[0], g.size[1], 300), spacing=g.spacing, origin_lps=g.origin_lps))
            write_dicom_series(tall, Path(tmp) / "tall")
            result["series_512x512x300"] = compare_loading(Path(tmp) / "tall", args.repeats)
        config = PhantomConfig()
        make_phantom(config, seed=0)  # warm up imports
        result["make_phantom_default"] = {"size": config.size, "spacing": config.spacing,
                                          **timed(lambda: make_phantom(config, seed=1), args.repeats)}
        oblique = PhantomConfig(direction=oblique_direction())
        result["make_phantom_oblique"] = timed(lambda: make_phantom(oblique, seed=1), args.repeats)
        image, _ = make_phantom(config, seed=2)
        result["save_nrrd_one_case"] = timed(lambda: save_volume(image, Path(tmp) / "one.nrrd"), args.repeats)
        counter = iter(range(1000))
        result["write_dicom_one_case"] = timed(
            lambda: write_dicom_series(image, Path(tmp) / f"d{next(counter)}"), args.repeats)
        result["write_cohort_12_nrrd"] = timed(lambda: write_cohort(Path(tmp) / "cohort", 12, seed=0), 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
