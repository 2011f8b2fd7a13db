"""Training pipeline costs, side by side: what to choose on a small CPU machine.

On a phantom cohort (``write_cohort``) with the tiny backbone, measures

* ``patches``: cutting one nodule's patch on the fly, plain (validation) vs augmented
  (random 3D rotation + flips + shift + intensity jitter + noise, still one interpolation);
* ``memory``: voxels kept per cohort, whole volumes vs cropped to the patches' reach;
* ``workers``: one training epoch (patches cut on the fly + LoRA forward/backward) with
  DataLoader ``num_workers`` 0, 1 and 2 — run interleaved, so load drift hits each alike;
* ``threads``: one LoRA training step with 1 vs 2 torch threads;
* ``checkpoint``: writing a resumable checkpoint, LoRA vs full fine-tuning.

Prints one JSON object (times in ms or s; ``*_ratio`` compares with the first option).

    python benchmarks/training.py [--cases 12] [--repeats 3] [--cohort DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12, help="phantom studies (4 nodules each)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is kept")
    parser.add_argument("--cohort", type=Path, help="reuse (or create) the cohort in this folder")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch

    from MedLoRALib.models import LoraSpec, build_model
    from MedLoRALib.patches import PatchSpec
    from MedLoRALib.synthetic import write_cohort
    from MedLoRALib.training.augment import AugmentConfig, cut_patch, patch_reach_mm, sample_rng
    from MedLoRALib.training.checkpoint import save_checkpoint
    from MedLoRALib.training.dataset import PatchDataset, ignore_sigint_in_worker
    from MedLoRALib.training.manifest import check_training_set

    torch.set_num_threads(1)
    folder = args.cohort or Path(tempfile.mkdtemp(prefix="medlora-bench-"))
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        write_cohort(folder, args.cases, seed=0)
    augment = AugmentConfig()
    spec9 = PatchSpec(views="multiview9", fov_mm=50.0, pixels=64)
    spec3 = PatchSpec(views="ortho3", fov_mm=50.0, pixels=64)
    full = check_training_set(manifest)
    cropped = check_training_set(manifest, reach_mm=patch_reach_mm(spec9, augment))
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                    "load_average_start": os.getloadavg()[0], "nodules": len(full.samples), "repeats": args.repeats}

    def median(fn, repeats: int = args.repeats, clock=time.perf_counter) -> float:
        times = []
        for _ in range(repeats):
            start = clock()
            fn()
            times.append(clock() - start)
        return statistics.median(times)

    # --- patches: plain vs augmented, CPU time per nodule -----------------------------------------
    samples = full.samples
    patches = {}
    for name, spec in (("multiview9_64", spec9), ("ortho3_64", spec3)):
        plain = median(lambda spec=spec: [cut_patch(cropped.images[s.image_key], s.centre_lps, spec) for s in samples],
                       clock=time.process_time)
        augmented = median(lambda spec=spec: [cut_patch(cropped.images[s.image_key], s.centre_lps, spec, augment,
                                              sample_rng(0, 1, i)) for i, s in enumerate(samples)],
                           clock=time.process_time)
        patches[name] = {"plain_ms": 1e3 * plain / len(samples), "augmented_ms": 1e3 * augmented / len(samples),
                         "augmented_ratio": augmented / plain}
    result["patches"] = patches

    # --- memory: whole volumes vs cropped to the reach of the patches ----------------------------
    full_bytes = sum(v.voxels_hu.nbytes for v in full.images.values())
    crop_bytes = sum(v.voxels_hu.nbytes for v in cropped.images.values())
    result["memory"] = {"whole_MB": full_bytes / 1e6, "cropped_MB": crop_bytes / 1e6,
                        "cropped_ratio": crop_bytes / full_bytes, "reach_mm": patch_reach_mm(spec9, augment)}
    # a clinical chest CT (512×512×300 int16 at 0.7×0.7×1.25 mm) with three nodules
    from MedLoRALib.geometry import Geometry
    from MedLoRALib.image import CTImage
    from MedLoRALib.training.manifest import crop_to_reach

    geometry = Geometry(size=(512, 512, 300), spacing=(0.7, 0.7, 1.25), origin_lps=(-180.0, -180.0, -375.0))
    ct = CTImage(np.zeros((300, 512, 512), dtype=np.int16), geometry)
    centres = [(-80.0, -20.0, -200.0), (70.0, 10.0, -150.0), (60.0, 40.0, -260.0)]
    kept = crop_to_reach(ct, centres, patch_reach_mm(spec9, augment))
    result["memory"]["clinical_ct_3_nodules"] = {"whole_MB": ct.voxels_hu.nbytes / 1e6,
                                                 "cropped_MB": kept.voxels_hu.nbytes / 1e6,
                                                 "cropped_ratio": kept.voxels_hu.nbytes / ct.voxels_hu.nbytes}

    # --- one epoch with 0, 1, 2 DataLoader workers (interleaved) ---------------------------------
    torch.manual_seed(0)
    model, info = build_model("medlora_tiny", patch_spec=spec3, mode="lora", lora=LoraSpec(), allow_random_init=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    criterion = torch.nn.BCEWithLogitsLoss()
    dataset = PatchDataset(cropped, spec3, augment, seed=0)
    order = np.random.default_rng(0).permutation(len(samples)).tolist()
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]

    def epoch(workers: int) -> None:
        model.train()
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                             worker_init_fn=ignore_sigint_in_worker if workers else None)
        for x, y, _ in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()

    epoch(0)  # warm-up
    times: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for _ in range(args.repeats):
        for workers in times:
            start = time.perf_counter()
            epoch(workers)
            times[workers].append(time.perf_counter() - start)
    base = statistics.median(times[0])
    result["workers"] = {f"workers_{w}": {"epoch_s": statistics.median(t), "images_per_s":
                                          len(samples) / statistics.median(t),
                                          "ratio": statistics.median(t) / base} for w, t in times.items()}

    # --- threads: one step, 1 vs 2 torch threads (interleaved) ----------------------------------
    x = torch.stack([dataset[i][0] for i in range(args.batch_size)])
    y = torch.randint(0, 2, (args.batch_size,)).float()

    def step() -> None:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()

    thread_times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for threads in thread_times:
            torch.set_num_threads(threads)
            thread_times[threads].append(median(step, repeats=5))
    torch.set_num_threads(1)
    one = statistics.median(thread_times[1])
    result["threads"] = {f"threads_{t}": {"step_ms": 1e3 * statistics.median(v), "ratio": statistics.median(v) / one}
                         for t, v in thread_times.items()}

    # --- checkpoint: LoRA vs full -------------------------------------------------------------------
    checkpoints = {}
    for mode in ("lora", "full"):
        torch.manual_seed(0)
        m, _ = build_model("medlora_tiny", patch_spec=spec3, mode=mode, lora=LoraSpec() if mode == "lora" else None,
                           allow_random_init=True)
        weights = {n: p for n, p in m.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW(list(weights.values()), lr=1e-3)
        m(x).sum().backward()
        opt.step()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        with tempfile.TemporaryDirectory() as tmp:
            save = lambda weights=weights, opt=opt, sched=sched: save_checkpoint(  # noqa: E731
                tmp, weights=weights, best_weights=weights, optimizer=opt, scheduler=sched, progress={"epoch": 0},
                config={})
            seconds = median(save)
            size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        checkpoints[mode] = {"save_ms": 1e3 * seconds, "size_MB": size / 1e6,
                             "trainable_parameters": sum(p.numel() for p in weights.values())}
    checkpoints["full_over_lora_size_ratio"] = checkpoints["full"]["size_MB"] / checkpoints["lora"]["size_MB"]
    result["checkpoint"] = checkpoints
    result["load_average_end"] = os.getloadavg()[0]
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
