"""Patch cutting speed: one interpolation from the original grid vs resample-then-crop.

For one synthetic 512×512×300 CT (0.7×0.7×1.25 mm, optionally oblique) and N nodule
centres, times

* ``extract``: ``extract_patches`` (every sample interpolated once from the original grid);
* ``resample_then_crop``: the common pipeline — SimpleITK resamples the whole volume to
  1 mm isotropic, then for each nodule a 50 mm cube is sliced out of the 1 mm array and
  the planes are interpolated from that cube (a second interpolation).

Both run on the same threads (``--threads``, default 1). The resample is a per-study
cost of the second approach: the output reports per-study totals for N nodules, per-nodule
costs with and without the resample, and the speed-up for one nodule per study (the
interactive case: a click in Slicer). Prints one JSON object.

    python benchmarks/patches.py [--nodules 64] [--repeats 3] [--oblique] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _set_threads(threads: int) -> None:
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodules", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is kept")
    parser.add_argument("--oblique", action="store_true", help="tilt the CT's direction matrix by ~10°")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 300), metavar=("I", "J", "K"))
    args = parser.parse_args(argv)
    _set_threads(args.threads)

    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    from MedLoRALib.geometry import Geometry
    from MedLoRALib.image import AIR_HU, CTImage
    from MedLoRALib.patches import PatchSpec, extract_patches, sample_points_lps

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    rng = np.random.default_rng(0)

    # With one thread, process CPU time is what the work costs on an idle core, even when other
    # processes share the machine; wall-clock medians are kept beside it.
    timer = time.process_time if args.threads == 1 else time.perf_counter
    wall_clock: dict[str, float] = {}

    def median_time(fn, repeats: int = args.repeats, label: str = "") -> tuple[float, object]:
        times, walls, result = [], [], None
        for _ in range(repeats):
            start, wall = timer(), time.perf_counter()
            result = fn()
            times.append(timer() - start)
            walls.append(time.perf_counter() - wall)
        if label:
            wall_clock[label] = float(np.median(walls))
        return float(np.median(times)), result

    # --- the CT: noisy "lung" inside a "body", int16 HU like a loaded series -------------
    direction = np.eye(3)
    if args.oblique:
        a, b = np.radians(10), np.radians(6)
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        direction = rz @ rx
    size = tuple(args.size)
    spacing = (0.7, 0.7, 1.25)
    origin = tuple(-np.asarray(size) * spacing / 2)
    geometry = Geometry(size, spacing, origin, direction)
    voxels = rng.normal(-800, 60, size=tuple(reversed(size))).astype(np.int16)
    ct = CTImage(voxels, geometry)
    margin_ijk = 40.0 / np.asarray(spacing)  # 40 mm from every face, also when oblique
    centres = geometry.ijk_to_lps(rng.uniform(margin_ijk, np.asarray(size) - 1 - margin_ijk,
                                              size=(args.nodules, 3)))

    specs = {"multiview9_64": PatchSpec(views="multiview9", fov_mm=50.0, pixels=64),
             "ortho3_224": PatchSpec(views="ortho3", fov_mm=50.0, pixels=224)}

    # --- approach 2: resample the whole volume to 1 mm, then crop ---------------------------
    def resample_1mm():
        image = ct.to_sitk()
        new_size = [int(np.ceil(n * s)) for n, s in zip(size, spacing)]
        return sitk.Resample(image, new_size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                             (1.0, 1.0, 1.0), image.GetDirection(), AIR_HU, sitk.sitkFloat32)

    resample_s, resampled = median_time(resample_1mm, repeats=max(1, min(args.repeats, 2)), label="resample_1mm")
    iso = CTImage(sitk.GetArrayFromImage(resampled), Geometry.from_sitk(resampled))
    del resampled

    def crop_from_iso(spec: PatchSpec) -> np.ndarray:
        """A 50 mm cube sliced from the 1 mm array, then the planes interpolated from it."""
        half = int(np.ceil(spec.fov_mm / 2)) + 1
        out = []
        for centre in centres:
            ijk = np.round(iso.geometry.lps_to_ijk(centre)).astype(int)
            lo_ijk = ijk - half
            cube = iso.voxels_hu[lo_ijk[2]:ijk[2] + half + 1, lo_ijk[1]:ijk[1] + half + 1,
                                 lo_ijk[0]:ijk[0] + half + 1]
            points = iso.geometry.lps_to_ijk(sample_points_lps(centre[None], spec)[0].reshape(-1, 3)) - lo_ijk
            values = ndimage.map_coordinates(cube, points[:, ::-1].T, order=1, mode="constant", cval=AIR_HU,
                                             prefilter=False, output=np.float32)
            out.append(values.reshape(spec.shape))
        return np.stack(out)

    results = {}
    for name, spec in specs.items():
        extract_s, _ = median_time(lambda spec=spec: extract_patches(ct, centres, spec), label=f"{name}_extract")
        crop_s, theirs = median_time(lambda spec=spec: crop_from_iso(spec), label=f"{name}_crop_from_1mm")
        raw = PatchSpec(views=spec.views, fov_mm=spec.fov_mm, pixels=spec.pixels, window_hu=None,
                        normalisation="none")
        one_nodule_s, _ = median_time(lambda spec=spec: extract_patches(ct, centres[:1], spec), repeats=max(5, args.repeats))
        n = len(centres)
        ours_hu = extract_patches(ct, centres, raw)
        results[name] = {
            "samples_per_nodule": int(np.prod(spec.shape)),
            "extract_ms_per_nodule": 1000 * extract_s / n,
            "extract_ms_single_nodule": 1000 * one_nodule_s,
            "resample_then_crop": {
                "resample_s_per_study": resample_s,
                "crop_ms_per_nodule": 1000 * crop_s / n,
                "ms_per_nodule_including_resample": 1000 * (resample_s + crop_s) / n,
            },
            "per_study_s": {"extract": extract_s, "resample_then_crop": resample_s + crop_s},
            "speedup_per_study": (resample_s + crop_s) / extract_s,
            "speedup_one_nodule_per_study": (resample_s + crop_s / n) / one_nodule_s,
            "speedup_per_nodule_crop_only": (crop_s / n) / (extract_s / n),
            "resample_then_crop_mean_abs_difference_hu": float(np.abs(ours_hu - theirs).mean()),
        }

    print(json.dumps({
        "benchmark": "patches",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
        "threads": args.threads,
        "timer": "process CPU time (one thread)" if args.threads == 1 else "wall clock",
        "wall_clock_s_for_all_nodules": wall_clock,
        "ct": {"size_ijk": size, "spacing_mm": spacing, "oblique": bool(args.oblique), "dtype": "int16"},
        "nodules": len(centres),
        "results": results,
        "targets": {
            "multiview9_64_under_10ms_per_nodule": results["multiview9_64"]["extract_ms_per_nodule"] < 10,
            "100x_vs_resample_then_crop_one_nodule": results["multiview9_64"]["speedup_one_nodule_per_study"] >= 100,
            "100x_vs_resample_then_crop_per_study": results["multiview9_64"]["speedup_per_study"] >= 100,
        },
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
