"""What one explanation costs: saliency on the adapter's planes and the mapping back into the CT.

On the real LIDC-IDRI-0001 nodule (``../shared/data``), multiview9 patches, one nodule:

* ``rollout`` / ``gradxinput``: ``saliency_maps`` on a LoRA (r=8, q and v) classifier —
  the shipped tiny backbone at 64 px and DINOv2 ViT-S/14 (random weights: the time is
  what matters) at ``--pixels`` px;
* ``map_block`` / ``map_full``: ``saliency_volume`` for the block of CT voxels around the
  nodule and for the CT's whole grid;
* the Spearman rho of the model-randomisation check for each method.

    python benchmarks/explain.py [--threads 2] [--pixels 112] [--repeats 3]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _timing import median_time  # noqa: E402  (benchmarks/_timing.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pixels", type=int, default=112, help="patch size for the ViT-S/14 run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from helpers import tiny_model

    from MedLoRALib.annotations import load_nodules
    from MedLoRALib.ctio import load_ct
    from MedLoRALib.explain.saliency import cell_pixels, randomised_copy, saliency_maps
    from MedLoRALib.explain.volume import rank_correlation, saliency_volume
    from MedLoRALib.patches import PatchSpec, extract_patches

    case = next(p.parent for p in sorted((ROOT.parent / "shared" / "data" / "lidc" / "LIDC-IDRI-0001").rglob("*.dcm")))
    image = load_ct(case)
    [nodule] = load_nodules(next(case.glob("*.xml")), image=image)
    centre = np.array([nodule.centre_lps])
    report = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "ct_size": image.geometry.size, "runs": []}
    setups = [("medlora_tiny", 64, dict(weights=ROOT / "MedLoRALib" / "assets" / "medlora_tiny_synthct.safetensors")),
              ("dinov2_vits14", args.pixels, dict(backbone="dinov2_vits14"))]
    for name, pixels, options in setups:
        spec = PatchSpec(views="multiview9", fov_mm=50.0, pixels=pixels)
        model = tiny_model(spec, scale=0.05, **options)
        patches = extract_patches(image, centre, spec)
        run = {"backbone": name, "pixels": pixels}
        for method in ("rollout", "gradxinput"):
            maps = saliency_maps(model, patches, method)
            run[f"{method}_s"] = round(median_time(partial(saliency_maps, model, patches, method), args.repeats, warmup=0), 4)
            run[f"{method}_randomisation_rho"] = round(
                rank_correlation(maps, saliency_maps(randomised_copy(model, 1), patches, method)), 3)
            cell = cell_pixels(model, method)
            run[f"{method}_map_block_s"] = round(
                median_time(partial(saliency_volume, maps[0], image, centre[0], spec, cell, method), args.repeats,
                            warmup=0), 4)
        run["map_full_grid_s"] = round(
            median_time(partial(saliency_volume, maps[0], image, centre[0], spec, 1, "gradxinput", full_grid=True), 1,
                        warmup=0), 4)
        run["block_size"] = saliency_volume(maps[0], image, centre[0], spec, 1).geometry.size
        report["runs"].append(run)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
