"""Fewer test-time augmentation variants: what they cost in AUC and what they save in time.

With test-time augmentation the engine averages the logits of in-plane flips/rotations of every
plane: ``d8``, all eight, makes a click score 8× the images of a plain forward pass. ``tta=True``
uses the adapter's own set (its manifest's ``tta``, ``NEW_ADAPTER_TTA`` for new adapters, ``d8``
for adapters that record none); this benchmark is the evidence for that default. It scores held-out
phantom nodules with trained adapters under each named TTA set of ``MedLoRALib.tta.TTA_SETS``
(``d8`` = all eight, ``rot4``, ``flip4``, ``flip2``, ``rot2``, ``none``) and prints per adapter
and set: the AUC with its bootstrap 95% interval (``training.metrics``), the paired bootstrap
interval of the AUC difference against ``d8`` (same resampled nodules), the label agreement with
``d8`` and the largest probability difference, and the time per nodule (a click: one nodule;
and a batch of all test nodules), as ratios against ``d8``, in one run. With
``--time-backbone dinov2_vits14`` it also times a click of a ViT-S/14 adapter (random init,
multiview9 64 px: the product's default) under each set.

Adapters: ``--adapters`` (folders written by ``medlora train``), or, without them, one is
trained per ``--seeds`` through ``medlora train`` itself (tiny ViT pre-trained on synthetic CT,
LoRA q/v, cohort drawn anew per seed). The test cohort (``--test-cases`` phantom studies,
``--test-seed``) is never used in training.

    HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/tta.py --threads 1 [--adapters A B ...]
        [--seeds 0 1 2] [--views multiview9 --fov-mm 50] [--test-cases 40] [--time-backbone dinov2_vits14]
        [--out result.json]

``--views multiview9 --fov-mm 50`` (64 px) trains adapters the way ``make demo`` does (the product's
default crop); the default ``ortho3`` over 24 mm is the first table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))

from _report import emit  # noqa: E402  (benchmarks/_report.py)
from _timing import median_time  # noqa: E402  (benchmarks/_timing.py)

PRETRAINED_TINY = ROOT / "MedLoRALib" / "assets" / "medlora_tiny_synthct.safetensors"


def paired_auc_difference(labels: np.ndarray, scores: np.ndarray, reference: np.ndarray, n_boot: int = 2000,
                          seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of AUC(scores) − AUC(reference) over the same resampled nodules."""
    from MedLoRALib.training.metrics import _fast_auc, both_classes

    rng = np.random.default_rng(seed)
    diffs = []
    while len(diffs) < n_boot:
        idx = rng.integers(0, len(labels), len(labels))
        if both_classes(labels[idx]):
            diffs.append(_fast_auc(labels[idx], scores[idx]) - _fast_auc(labels[idx], reference[idx]))
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return float(lo), float(hi)


def train_adapters(seeds: list[int], args, work: Path) -> list[Path]:
    """One LoRA q/v adapter per seed, trained by ``medlora train`` on a cohort drawn for that seed."""
    from MedLoRALib.patches import PatchSpec
    from MedLoRALib.synthetic import write_cohort
    from MedLoRALib.training import trainer as T

    adapters = []
    for seed in seeds:
        manifest = write_cohort(work / f"train{seed}", args.cases, seed=seed)
        result = T.train(T.TrainConfig(
            manifest=manifest, out=work / f"adapter{seed}", backbone="medlora_tiny", weights=PRETRAINED_TINY,
            patch_spec=PatchSpec(args.views, fov_mm=args.fov_mm, pixels=args.pixels), epochs=args.epochs,
            batch_size=16, seed=seed, threads=args.threads))
        print(f"trained seed {seed}: validation AUC {result.metrics['auc']:.3f}", file=sys.stderr, flush=True)
        adapters.append(result.adapter)
    return adapters


def evaluate_adapter(path: Path, data, sets: list[str], repeats: int) -> dict:
    from MedLoRALib.engine import ScoringEngine
    from MedLoRALib.patches import extract_patches
    from MedLoRALib.training.metrics import bootstrap_auc_ci, roc_auc
    from MedLoRALib.tta import TTA_SETS

    engine = ScoringEngine(device="cpu")
    manifest = engine.attach_adapter(path)  # the backbone is found by the SHA-256 in its manifest
    labels = data.labels
    patches = np.concatenate([extract_patches(data.images[s.image_key], np.array([s.centre_lps]), manifest.spec)
                              for s in data.samples])
    scored = {name: engine.score_patches(patches, tta=name) for name in sets}
    probs = {name: np.array([r["probability"] for r in results]) for name, results in scored.items()}
    reference = "d8"
    out: dict = {"adapter": str(path), "backbone": manifest.backbone, "views": manifest.spec.views,
                 "pixels": manifest.spec.pixels, "fov_mm": manifest.spec.fov_mm, "lora": manifest.lora,
                 "validation_auc_in_manifest": manifest.metrics.get("auc"), "n_test": int(len(labels)),
                 "sets": {}}
    click = patches[:1]
    times = {}
    for name in sets:
        times[name] = {
            "click_s": median_time(lambda name=name: engine.score_patches(click, tta=name), repeats),
            "batch_s_per_nodule": median_time(lambda name=name: engine.score_patches(patches, tta=name),
                                              max(1, repeats // 2)) / len(patches)}
    for name in sets:
        p = probs[name]
        auc = roc_auc(labels, p)
        lo, hi = bootstrap_auc_ci(labels, p)
        dlo, dhi = paired_auc_difference(labels, p, probs[reference])
        out["sets"][name] = {
            "variants": len(TTA_SETS[name]),
            "auc": round(auc, 4), "auc_ci95": [round(lo, 3), round(hi, 3)],
            "auc_minus_d8": round(auc - roc_auc(labels, probs[reference]), 4),
            "auc_minus_d8_ci95": [round(dlo, 3), round(dhi, 3)],
            "label_agreement_with_d8": round(float(np.mean((p >= manifest.threshold)
                                                           == (probs[reference] >= manifest.threshold))), 4),
            "max_abs_dp_vs_d8": round(float(np.max(np.abs(p - probs[reference]))), 4),
            "click_ms": round(1000 * times[name]["click_s"], 2),
            "batch_ms_per_nodule": round(1000 * times[name]["batch_s_per_nodule"], 3),
            "click_vs_d8": round(times[name]["click_s"] / times[reference]["click_s"], 3),
            "batch_vs_d8": round(times[name]["batch_s_per_nodule"] / times[reference]["batch_s_per_nodule"], 3)}
    return out


def vits_click_times(backbone: str, sets: list[str], repeats: int, work: Path) -> dict:
    """Seconds per click (one nodule, patches pre-cut) of a random-init adapter under each TTA set."""
    from helpers import save_tiny_adapter

    from MedLoRALib.engine import ScoringEngine
    from MedLoRALib.patches import PatchSpec
    from MedLoRALib.tta import TTA_SETS

    spec = PatchSpec(views="multiview9", fov_mm=50.0, pixels=64)
    path, _ = save_tiny_adapter(work, f"time-{backbone}", spec, backbone=backbone, scale=0.02)
    engine = ScoringEngine(device="cpu")
    engine.attach_adapter(path)
    patch = np.random.default_rng(0).random((1, *spec.shape), dtype=np.float32)
    times = {}
    for _ in range(repeats):  # interleaved: load changes hit every set alike
        for name in sets:
            start = time.perf_counter()
            engine.score_patches(patch, tta=name)
            times.setdefault(name, []).append(time.perf_counter() - start)
    medians = {name: statistics.median(values[1:] or values) for name, values in times.items()}
    return {"backbone": f"{backbone} (random init)", "views": "multiview9", "pixels": 64,
            "sets": {name: {"variants": len(TTA_SETS[name]), "click_s": round(medians[name], 4),
                            "click_vs_d8": round(medians[name] / medians["d8"], 3)} for name in sets}}


def summarise(per_adapter: list[dict], sets: list[str]) -> dict:
    summary = {}
    for name in sets:
        rows = [a["sets"][name] for a in per_adapter]
        diffs = [r["auc_minus_d8"] for r in rows]
        summary[name] = {
            "auc_mean": round(statistics.mean(r["auc"] for r in rows), 4),
            "auc_minus_d8_per_adapter": diffs,
            "auc_minus_d8_mean": round(statistics.mean(diffs), 4),
            "paired_ci_excludes_loss_below_0.02": all(r["auc_minus_d8_ci95"][0] > -0.02 for r in rows),
            "label_agreement_min": min(r["label_agreement_with_d8"] for r in rows),
            "click_vs_d8_median": round(statistics.median(r["click_vs_d8"] for r in rows), 3),
            "batch_vs_d8_median": round(statistics.median(r["batch_vs_d8"] for r in rows), 3)}
    return summary


def main(argv: list[str] | None = None) -> int:
    from MedLoRALib.tta import TTA_SETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", nargs="*", type=Path, help="trained adapter folders (default: train one per seed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cases", type=int, default=64, help="training phantom studies per seed")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--views", default="ortho3")
    parser.add_argument("--pixels", type=int, default=64)
    parser.add_argument("--fov-mm", type=float, default=24.0)
    parser.add_argument("--test-cases", type=int, default=40, help="held-out phantom studies (4 nodules each)")
    parser.add_argument("--test-seed", type=int, default=1000)
    parser.add_argument("--sets", nargs="+", default=list(TTA_SETS), choices=list(TTA_SETS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-backbone", help="also time a click of this backbone (random init) per set")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if "d8" not in args.sets:
        args.sets.insert(0, "d8")
    import torch

    from MedLoRALib.synthetic import write_cohort
    from MedLoRALib.training.manifest import check_training_set

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="medlora-tta-"))
    load_before = [round(x, 2) for x in os.getloadavg()]
    adapters = args.adapters or train_adapters(args.seeds, args, work)
    data = check_training_set(write_cohort(work / "test", args.test_cases, seed=args.test_seed))
    per_adapter = [evaluate_adapter(path, data, args.sets, args.repeats) for path in adapters]
    report = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "cpus": os.cpu_count(), "threads": args.threads},
              "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
              "test_cohort": {"studies": args.test_cases, "seed": args.test_seed, "nodules": len(data.samples),
                              "malignant": int(data.labels.sum())},
              "summary": summarise(per_adapter, args.sets), "adapters": per_adapter}
    if args.time_backbone:
        report["click_time"] = vits_click_times(args.time_backbone, args.sets, args.repeats, work)
    report["load"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
    return emit(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
