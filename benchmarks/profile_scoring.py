"""Where the time of one click goes: crop, TTA build, ViT stages, head — and GFLOP/s achieved.

One nodule of a synthetic phantom CT is scored as the engine does (default TTA ×8 of
every plane, all variants in one forward pass) with a randomly initialised backbone
(timing only). Each stage is timed separately (median of ``--repeats``), the FLOPs are
counted with ``torch.utils.flop_counter``, and the torch profiler's top operators are
listed, for the fp32 path and, with ``--precision``, the other precision paths.

    python benchmarks/profile_scoring.py [--backbone dinov2_vits14] [--threads 1] [--precision fp32 int8]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))

from _timing import median_time  # noqa: E402  (benchmarks/_timing.py)
from helpers import tiny_model  # noqa: E402  (Testing/helpers.py)

from MedLoRALib.device import cpu_peak_gflops, precision_context, prepare_for_precision  # noqa: E402
from MedLoRALib.engine import apply_tta  # noqa: E402
from MedLoRALib.models import LoraSpec  # noqa: E402
from MedLoRALib.patches import PatchSpec, extract_patches  # noqa: E402
from MedLoRALib.synthetic import make_phantom  # noqa: E402
from MedLoRALib.tta import TTA_TRANSFORMS  # noqa: E402


def fp32_flops(model, stacked: torch.Tensor) -> int:
    """FLOPs of the fp32 forward pass (the counter does not see quantised kernels: int8 is
    reported as fp32-equivalent GFLOP/s)."""
    reference = getattr(model, "_fp32_reference", model)
    with FlopCounterMode(display=False) as counter:
        reference.view_logits(stacked)
    return counter.get_total_flops()


def stages(model, image, centre, spec, repeats: int, precision: str) -> dict:
    """Median seconds of each stage of one click, and the forward's FLOPs and GFLOP/s."""
    vit = model.vit
    out: dict = {}
    out["crop_s"] = median_time(lambda: extract_patches(image, centre, spec), repeats)
    batch = torch.from_numpy(np.ascontiguousarray(extract_patches(image, centre, spec), dtype=np.float32))
    out["tta_build_s"] = median_time(lambda: torch.cat([apply_tta(batch, k, f) for k, f in TTA_TRANSFORMS]), repeats)
    stacked = torch.cat([apply_tta(batch, k, f) for k, f in TTA_TRANSFORMS])
    images = model._images(stacked)
    with torch.inference_mode(), precision_context(torch.device("cpu"), precision):
        embed = lambda: vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))  # noqa: E731
        out["patch_embed_s"] = median_time(embed, repeats)
        x = embed()
        out["tokens_per_image"] = int(x.shape[1])
        out["images"] = int(x.shape[0])
        block_times = []
        for block in vit.blocks:
            block_times.append(median_time(lambda b=block, x=x: b(x), repeats))
            x = block(x)
        out["block_s_each"] = [round(t, 4) for t in block_times]
        out["blocks_total_s"] = sum(block_times)
        out["head_s"] = median_time(lambda: model.head(model.fc_norm(vit.pool(model.norm(x)))), repeats)
        out["forward_s"] = median_time(lambda: model.view_logits(stacked), repeats)
        flops = fp32_flops(model, stacked)
        out["gflop_per_click"] = round(flops / 1e9, 2)
        out["achieved_gflops"] = round(flops / out["forward_s"] / 1e9, 1)
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        with profiler:
            model.view_logits(stacked)
        table = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in table) or 1
        out["top_ops_self_cpu_share"] = {e.key: round(e.self_cpu_time_total / total, 3) for e in table[:8]}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def forward_by_tta_count(models: dict, spec, counts: list[int], rounds: int = 5) -> dict:
    """Forward seconds of one nodule with the first ``n`` TTA variants, every path and ``n``
    interleaved (what fewer TTA variants would buy; whether the AUC allows it is not measured here)."""
    batch = torch.rand(1, *spec.shape, generator=torch.Generator().manual_seed(0))
    fns = {}
    for name, model in models.items():
        for n in counts:
            stacked = torch.cat([apply_tta(batch, k, f) for k, f in TTA_TRANSFORMS[:n]])
            fns[f"{name} tta{n}"] = lambda m=model, x=stacked: m.view_logits(x)
    times: dict = {key: [] for key in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(rounds):
            for key, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    return {key: round(statistics.median(values), 3) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--views", default="multiview9")
    parser.add_argument("--pixels", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--tta-counts", type=int, nargs="*", default=[1, 2, 4, 8],
                        help="also time the forward with this many TTA variants (interleaved)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = PatchSpec(views=args.views, pixels=args.pixels)
    model = tiny_model(spec, backbone=args.backbone, lora=LoraSpec(rank=8, targets="qv"), scale=0.02)
    image, nodules = make_phantom(seed=0)
    centre = np.array([nodules[0].centre_lps])
    result = {"load_before": os.getloadavg(), "threads": args.threads, "backbone": args.backbone,
              "patch_spec": spec.to_dict(), "tta_variants": len(TTA_TRANSFORMS),
              "peak_gflops_estimate": cpu_peak_gflops(args.threads), "paths": {}}
    prepared = {}
    for precision in args.precision:
        fast = prepared[precision] = prepare_for_precision(model, precision, lora_name="default")
        if fast is not model:
            fast.__dict__["_fp32_reference"] = model  # not a submodule
        result["paths"][precision] = stages(fast, image, centre, spec, args.repeats, precision)
        print(json.dumps({precision: result["paths"][precision]}), file=sys.stderr)
    if args.tta_counts:
        result["forward_s_by_tta_variants"] = forward_by_tta_count(prepared, spec, args.tta_counts)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
