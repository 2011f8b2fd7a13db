"""Scoring throughput (nodules/s, crop included) and merged vs unmerged LoRA inference.

For each backbone (random init is fine for timing) one ScoringEngine scores nodules of a
synthetic phantom CT: patches are cut from the CT (``extract_patches``) and scored, at
batch 1 (one call per nodule) and batch 64 (one call for 64 nodules), without and with
test-time augmentation. Then the same LoRA classifier runs a forward pass with LoRA
unmerged (peft layers), merged into the split q/v weights, and — for reference — the
plain backbone with timm's fused qkv and no LoRA. Last, precision paths side by side in
one engine (``precision`` section): the fp32 path (today's) against int8 (and bf16 if
asked), interleaved rounds, for a click (one nodule, TTA ×8) and batch 64 without TTA,
with the ratios new/old, the label agreement and the largest probability difference,
and the load average before and after.

    python benchmarks/scoring.py [--backbones medlora_tiny dinov2_vits14] [--threads 2]
    python benchmarks/scoring.py --sections precision --backbones dinov2_vits14 --precision-threads 2 1

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))

from _timing import median_time  # noqa: E402  (benchmarks/_timing.py)
from helpers import tiny_model  # noqa: E402  (Testing/helpers.py)

from MedLoRALib.adapters import AdapterManifest  # noqa: E402
from MedLoRALib.adapters.package import save_adapter  # noqa: E402
from MedLoRALib.device import cpu_peak_gflops  # noqa: E402
from MedLoRALib.engine import ScoringEngine  # noqa: E402
from MedLoRALib.models import LoraSpec, create_backbone  # noqa: E402
from MedLoRALib.nodule import Nodule  # noqa: E402
from MedLoRALib.patches import PatchSpec, extract_patches  # noqa: E402
from MedLoRALib.synthetic import make_phantom  # noqa: E402


def _nodules(n: int, seed: int = 0):
    """``n`` nodule positions around the phantom's real nodules (all inside the CT)."""
    image, nodules = make_phantom(seed=seed)
    rng = np.random.default_rng(seed)
    base = np.array([nd.centre_lps for nd in nodules])
    centres = base[np.arange(n) % len(base)] + rng.uniform(-3, 3, size=(n, 3))
    return image, [Nodule(centre_lps=tuple(c), nodule_id=f"n{i}") for i, c in enumerate(centres)]


def _perturbed_lora_model(backbone: str, spec: PatchSpec):
    return tiny_model(spec, backbone=backbone, lora=LoraSpec(rank=8, targets="qv"), scale=0.02)


def scoring_throughput(backbone: str, spec: PatchSpec, workdir: Path, with_tta_64: bool) -> dict:
    model = _perturbed_lora_model(backbone, spec)
    path = save_adapter(model, AdapterManifest(name=f"bench-{backbone}"), workdir / f"bench-{backbone}")
    engine = ScoringEngine(device="cpu")
    engine.attach_adapter(path)
    image, nodules = _nodules(64)
    out: dict = {"views": spec.views, "pixels": spec.pixels, "vit_images_per_nodule": model.views}
    crop_64 = median_time(lambda: extract_patches(image, np.array([n.centre_lps for n in nodules]), spec), 3)
    out["crop_only_64_nodules_s"] = round(crop_64, 4)
    few = nodules[:8]
    batch1 = median_time(lambda: [engine.score(image, [n], tta=False) for n in few], 2) / len(few)
    out["batch1_nodules_per_s"] = round(1.0 / batch1, 2)
    batch64 = median_time(lambda: engine.score(image, nodules, tta=False), 2)
    out["batch64_nodules_per_s"] = round(64 / batch64, 2)
    out["batch64_vs_batch1"] = round(batch1 * 64 / batch64, 2)
    if with_tta_64:
        tta64 = median_time(lambda: engine.score(image, nodules, tta=True), 1)
        out["batch64_tta8_nodules_per_s"] = round(64 / tta64, 2)
        out["tta8_slowdown"] = round(tta64 / batch64, 2)
        tta1 = median_time(lambda: [engine.score(image, [n], tta=True) for n in few[:4]], 1) / 4
        out["batch1_tta8_nodules_per_s"] = round(1.0 / tta1, 2)
    return out


def _interleaved(fns: dict, rounds: int) -> dict:
    """Median time of each function, run in alternation so that load changes hit all alike."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def merged_vs_unmerged(backbone: str, spec: PatchSpec, images: int, rounds: int) -> dict:
    model = _perturbed_lora_model(backbone, spec)
    merged_model = copy.deepcopy(model)
    merged_model.backbone.merge_adapter()
    patches = torch.rand(max(1, images // model.views), *spec.shape, generator=torch.Generator().manual_seed(1))
    fused, _ = create_backbone(backbone, allow_random_init=True, img_size=spec.pixels)
    images = model._images(patches)  # exactly the images the classifier feeds its backbone
    with torch.inference_mode():
        difference = float((merged_model(patches) - model(patches)).abs().max())
        times = _interleaved({"unmerged": lambda: model(patches), "merged": lambda: merged_model(patches),
                              "plain": lambda: fused(images)}, rounds)
    n_images = images.shape[0]
    return {
        "images": n_images,
        "unmerged_images_per_s": round(n_images / times["unmerged"], 1),
        "merged_images_per_s": round(n_images / times["merged"], 1),
        "merged_speedup": round(times["unmerged"] / times["merged"], 3),
        "merged_max_abs_logit_diff": difference,
        "plain_fused_qkv_no_lora_images_per_s": round(n_images / times["plain"], 1),
        "merged_split_vs_plain_fused": round(times["plain"] / times["merged"], 3),
    }


def _with_threads(fn, threads: int):
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return run


def precision_paths(backbone: str, spec: PatchSpec, workdir: Path, precisions: list[str], rounds: int,
                    threads: list[int]) -> dict:
    """fp32 (the old path) vs the others in one engine: a click with TTA ×8 and batch 64 without TTA.

    Every (precision, threads) pair runs in the same interleaved rounds; ratios are against
    fp32 at the first thread count.
    """
    model = _perturbed_lora_model(backbone, spec)
    path = save_adapter(model, AdapterManifest(name=f"prec-{backbone}"), workdir / f"prec-{backbone}")
    engine = ScoringEngine(device="cpu", precision="fp32")
    engine.attach_adapter(path)
    image, nodules = _nodules(64)
    paths = [(p, t) for t in threads for p in precisions]
    key = {(p, t): f"{p}@{t}t" for p, t in paths}
    click = {key[p, t]: _with_threads(lambda p=p: engine.score(image, nodules[:1], tta=True, precision=p), t)
             for p, t in paths}
    batch = {key[p, t]: _with_threads(lambda p=p: engine.score(image, nodules, tta=False, precision=p), t)
             for p, t in paths}
    out: dict = {"load_before": [round(v, 2) for v in os.getloadavg()], "rounds": rounds}
    click_s = _interleaved(click, rounds)
    batch_s = _interleaved(batch, rounds)
    reference = engine.score(image, nodules, tta=False, precision="fp32")
    reference_tta = engine.score(image, nodules[:8], tta=True, precision="fp32")
    old = key["fp32", threads[0]]
    for p in precisions:
        scored = engine.score(image, nodules, tta=False, precision=p)
        scored_tta = engine.score(image, nodules[:8], tta=True, precision=p)
        pairs = list(zip(reference, scored)) + list(zip(reference_tta, scored_tta))
        out[p] = {
            "same_label_as_fp32": f"{sum(a['label'] == b['label'] for a, b in pairs)}/{len(pairs)}",
            "max_abs_probability_diff": float(max(abs(a["probability"] - b["probability"]) for a, b in pairs)),
        }
    for p, t in paths:
        name = key[p, t]
        out[name] = {
            "click_tta8_s": round(click_s[name], 3),
            f"click_vs_{old}": round(click_s[old] / click_s[name], 2),
            "batch64_nodules_per_s": round(64 / batch_s[name], 1),
            f"batch64_vs_{old}": round(batch_s[old] / batch_s[name], 2),
        }
    out["load_after"] = [round(v, 2) for v in os.getloadavg()]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["medlora_tiny", "dinov2_vits14"])
    parser.add_argument("--views", default="multiview9")
    parser.add_argument("--pixels", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--merge-images", type=int, default=144, help="images per merged/unmerged forward pass")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the merged/unmerged timing")
    parser.add_argument("--tta-for", nargs="*", default=["medlora_tiny"],
                        help="backbones also timed with 8-fold TTA")
    parser.add_argument("--sections", nargs="+", default=["throughput", "merged", "precision"],
                        choices=["throughput", "merged", "precision"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"],
                        help="precision paths compared with fp32 (the first is the reference: keep fp32)")
    parser.add_argument("--precision-rounds", type=int, default=3)
    parser.add_argument("--precision-threads", type=int, nargs="+",
                        help="thread counts interleaved in the precision section (default: --threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = PatchSpec(views=args.views, pixels=args.pixels)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, CPU", "torch": torch.__version__,
              "threads": args.threads, "cpu": cpu_peak_gflops(args.threads), "patch_spec": spec.to_dict(), "lora": "r=8 qv (split qkv)",
              "scoring": {}, "merged_vs_unmerged": {}, "precision": {}}
    precisions = ["fp32"] + [p for p in args.precisions if p != "fp32"]
    with tempfile.TemporaryDirectory() as workdir:
        for backbone in args.backbones:
            if "throughput" in args.sections:
                result["scoring"][backbone] = scoring_throughput(backbone, spec, Path(workdir),
                                                                 backbone in args.tta_for)
            if "merged" in args.sections:
                result["merged_vs_unmerged"][backbone] = merged_vs_unmerged(backbone, spec, args.merge_images,
                                                                            args.rounds)
            if "precision" in args.sections:
                result["precision"][backbone] = precision_paths(backbone, spec, Path(workdir), precisions,
                                                                args.precision_rounds,
                                                                args.precision_threads or [args.threads])
            print(json.dumps({backbone: {k: result[k].get(backbone) for k in ("scoring", "precision")}}),
                  file=sys.stderr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
