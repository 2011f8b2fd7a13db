"""Last-N-block LoRA: training step time against full fine-tuning, and what it costs in AUC.

Issue 16 asks for the LoRA step at ≤ 0.5× the time of full fine-tuning at equal validation AUC.
Two sections, one JSON object:

* ``step`` — one optimizer step of DINOv2 ViT-S/14 (random init: time only; axial images of
  ``--step-pixels`` px, 112 by default as DESIGN.md's table, batch 16) built by the product's ``build_model`` and stepped as
  the trainer steps (forward, class-weighted BCE, backward, clipping, AdamW from
  ``training.schedule``): full fine-tuning, LoRA q/v (the default ``LoraSpec``) on every block
  and on the last N blocks (``--last-n-blocks``, the earlier blocks run under ``torch.no_grad``),
  and the control ``lora_qv_last4_grad``: the same last-4 LoRA with the earlier blocks run with
  autograd on (what ``no_grad`` itself buys). Variants interleaved round by round; medians;
  ratios against full.
* ``auc`` — ``medlora train`` itself (``training.trainer.train``) on a phantom cohort drawn
  anew per seed, with a backbone pre-trained on synthetic CT (``--backbone``/``--weights``; by
  default the shipped tiny ViT ``medlora_tiny_synthct``, 6 blocks; ``dinov2_vits14`` with weights
  from ``scripts/pretrain_tiny_backbone.py --backbone dinov2_vits14 --pixels 56``): LoRA q/v on
  all blocks and on the last N (N below the backbone's depth), and full fine-tuning, the same
  epochs for every variant (patience = epochs), in the order of ``--variants``. Per run: validation AUC
  at the best epoch (what the adapter keeps) with its bootstrap 95% interval, AUC at the last
  epoch, the median optimizer-step time of the trainer's own step events, training wall time;
  then per variant the mean and spread over seeds, the per-seed differences against full, and
  the step-time ratio against full. With ``--out`` the report is rewritten after every run, so
  a run cut short keeps what finished; ``--merge A.json B.json`` summarises the ``auc`` runs of
  several such reports (e.g. one process per seed) as one.

    HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/training_speed.py --threads 1 \
        [--sections step,auc] [--last-n 8 6 4 2] [--seeds 0 1 2] [--cases 64] [--epochs 20] \
        [--backbone dinov2_vits14 --weights VITS.safetensors --pixels 56] [--step-pixels 56] \
        [--variants full lora_qv_last4 lora_qv] [--lora-lr 3e-3] [--keep-adapters DIR] [--out result.json]
    python benchmarks/training_speed.py --merge seed0.json seed1.json [--out merged.json]
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import emit  # noqa: E402  (benchmarks/_report.py)

PRETRAINED_TINY = ROOT / "MedLoRALib" / "assets" / "medlora_tiny_synthct.safetensors"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- ViT-S/14 step time -----------------------------------------------------------------------------


def step_variants(last_n: list[int]) -> dict:
    """name -> (mode, LoraSpec or None, run the frozen blocks under no_grad)."""
    from MedLoRALib.lora_spec import LoraSpec

    variants = {"full": ("full", None, True), "lora_qv": ("lora", LoraSpec(), True)}
    for n in last_n:
        variants[f"lora_qv_last{n}"] = ("lora", LoraSpec(last_n_blocks=n), True)
    if 4 in last_n:
        variants["lora_qv_last4_grad"] = ("lora", LoraSpec(last_n_blocks=4), False)
    return variants


def vits_step_times(last_n: list[int], rounds: int, batch_size: int, pixels: int) -> dict:
    """Median wall/CPU seconds of one training step per variant, variants interleaved round by round."""
    import numpy as np
    import torch

    from MedLoRALib.models import build_model, trainable_parameter_count
    from MedLoRALib.patches import PatchSpec
    from MedLoRALib.training.schedule import make_optimizer

    spec = PatchSpec(views="axial", fov_mm=50.0, pixels=pixels)
    variants = step_variants(last_n)
    steps = {}
    for name, (mode, lora, no_grad) in variants.items():
        torch.manual_seed(0)
        model, _ = build_model("dinov2_vits14", patch_spec=spec, mode=mode, lora=lora,
                               allow_random_init=True, pretrained=False)
        if not no_grad:
            model.frozen_blocks = 0
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(trainable, 1e-4, 0.05, 1000, 0.1)
        steps[name] = (model, trainable, optimizer, scheduler, trainable_parameter_count(model))
    generator = torch.Generator().manual_seed(0)
    patches = torch.rand((batch_size, *spec.shape), generator=generator)
    labels = (torch.arange(batch_size) % 2).float()
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(1.0))
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    load_before = _load()
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, (model, trainable, optimizer, scheduler, _) in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            optimizer.zero_grad(set_to_none=True)
            criterion(model(patches), labels).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            if round_index:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    full_wall, full_cpu = float(np.median(wall["full"])), float(np.median(cpu["full"]))
    return {
        "backbone": "dinov2_vits14 (random init, 12 blocks)", "pixels": pixels, "views": "axial",
        "batch_images": batch_size, "rounds": rounds, "load_before": load_before, "load_after": _load(),
        "variants": {name: {
            "frozen_blocks_no_grad": steps[name][0].frozen_blocks,
            "trainable_parameters": steps[name][4][0],
            "step_wall_s": round(float(np.median(wall[name])), 4),
            "step_cpu_s": round(float(np.median(cpu[name])), 4),
            "wall_vs_full": round(float(np.median(wall[name])) / full_wall, 3),
            "cpu_vs_full": round(float(np.median(cpu[name])) / full_cpu, 3),
        } for name in variants}}


# --- AUC through the real trainer ------------------------------------------------------------------


def backbone_depth(backbone: str) -> int:
    """Number of transformer blocks (built on the meta device: no memory, no weights)."""
    import timm

    from MedLoRALib.models import get_backbone_config

    config = get_backbone_config(backbone)
    return len(timm.create_model(config.timm_name, pretrained=False, num_classes=0, device="meta",
                                 **config.timm_kwargs).blocks)


def auc_variants(last_n: list[int], depth: int, order: list[str] | None = None) -> dict:
    """name -> (mode, LoraSpec or None) for the trainer runs; last-N only for N below ``depth``.

    ``order`` (variant names) picks and orders the runs, so the most telling finish first.
    """
    from MedLoRALib.lora_spec import LoraSpec

    variants = {"lora_qv": ("lora", LoraSpec())}
    for n in last_n:
        if n < depth:
            variants[f"lora_qv_last{n}"] = ("lora", LoraSpec(last_n_blocks=n))
    variants["full"] = ("full", None)
    if not order:
        return variants
    unknown = [name for name in order if name not in variants]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(variants)} (--last-n sets the N)")
    return {name: variants[name] for name in order}


def train_once(manifest: Path, out: Path, mode: str, lora, seed: int, args) -> dict:
    """One ``medlora train`` run; its AUCs, step time (from the step events) and wall time."""
    from MedLoRALib.patches import PatchSpec
    from MedLoRALib.training import trainer as T
    from MedLoRALib.training.progress import CallbackReporter

    step_s: list[float] = []

    def on_event(event: dict) -> None:
        if event["event"] == "step" and event["global_step"] > 1:  # the first step warms up
            step_s.append(args.batch_size / event["images_per_s"])

    config = T.TrainConfig(
        manifest=manifest, out=out, backbone=args.backbone, weights=Path(args.weights), mode=mode,
        **({"lora": lora} if lora is not None else {}),
        patch_spec=PatchSpec(args.views, fov_mm=args.fov_mm, pixels=args.pixels),
        epochs=args.epochs, patience=args.epochs, batch_size=args.batch_size, seed=seed,
        lr=args.lora_lr if mode == "lora" else None,
        val_fraction=0.2, threads=args.threads, progress_every=1, overwrite=True)
    start = time.perf_counter()
    result = T.train(config, CallbackReporter(on_event))
    wall = time.perf_counter() - start
    history = result.history["holdout"]
    best_epoch = max((h["epoch"] for h in history if h["best"]), default=None)  # the weights kept
    return {"auc_best": round(result.metrics["auc"], 4),
            "auc_best_ci95": [round(x, 3) for x in result.metrics["auc_ci95"]],
            "auc_last": round(history[-1]["val_auc"], 4), "best_epoch": best_epoch,
            "n_val": result.metrics["n"], "step_s_median": round(statistics.median(step_s), 4),
            "train_wall_s": round(wall, 1)}


def auc_summary(runs: dict[str, dict[str, dict]]) -> dict:
    """Per variant: AUC mean/SD over its seeds, per-seed differences against full, step-time ratio.

    Differences are paired by seed and taken only where both the variant and full ran;
    ``best_vs_full`` adds their t interval and sign count (``_seed_stats.paired``).
    """
    from _seed_stats import paired

    full = runs.get("full", {})
    full_step = statistics.median([r["step_s_median"] for r in full.values()]) if full else None
    summary = {}
    for name, per_seed in runs.items():
        if not per_seed:
            continue
        best = [r["auc_best"] for r in per_seed.values()]
        last = [r["auc_last"] for r in per_seed.values()]
        step = statistics.median([r["step_s_median"] for r in per_seed.values()])
        summary[name] = {
            "seeds": sorted(per_seed, key=int),
            "auc_best_mean": round(statistics.mean(best), 4),
            "auc_best_sd": round(statistics.stdev(best), 4) if len(best) > 1 else None,
            "auc_last_mean": round(statistics.mean(last), 4),
            "auc_last_sd": round(statistics.stdev(last), 4) if len(last) > 1 else None,
            "auc_best_minus_full_per_seed": {s: round(r["auc_best"] - full[s]["auc_best"], 4)
                                             for s, r in sorted(per_seed.items(), key=lambda x: int(x[0]))
                                             if s in full},
            "step_s_median": step,
            "step_vs_full": round(step / full_step, 3) if full_step else None}
        common = [s for s in per_seed if s in full]
        if name != "full" and len(common) > 1:
            summary[name]["best_vs_full"] = paired([per_seed[s]["auc_best"] for s in common],
                                                   [full[s]["auc_best"] for s in common])
    return summary


def auc_comparison(args, report: dict) -> dict:
    """The trainer runs; ``report["auc"]`` is updated (and ``--out`` rewritten) after each one."""
    from MedLoRALib.synthetic import write_cohort

    variants = auc_variants(args.last_n, backbone_depth(args.backbone), args.variants)
    if args.lora_lr is not None:  # named apart, so --merge can pair them with default-rate runs
        variants = {f"{name}_lr{args.lora_lr:g}" if mode == "lora" else name: (mode, lora)
                    for name, (mode, lora) in variants.items()}
    runs: dict[str, dict[str, dict]] = {name: {} for name in variants}
    work = Path(tempfile.mkdtemp(prefix="medlora-trainspeed-"))
    keep = Path(args.keep_adapters) if args.keep_adapters else None
    section = {"backbone": args.backbone, "weights": str(args.weights), "cases": args.cases,
               "views": args.views, "pixels": args.pixels, "fov_mm": args.fov_mm, "epochs": args.epochs,
               "batch_size": args.batch_size, "seeds": args.seeds,
               "lr": "trainer default per mode" if args.lora_lr is None else f"LoRA {args.lora_lr:g}, full default",
               "load_before": _load(), "complete": False, "adapters": str(keep) if keep else None}
    report["auc"] = section
    for seed in args.seeds:
        manifest = write_cohort(work / f"cohort{seed}", args.cases, seed=seed)
        for name, (mode, lora) in variants.items():
            out = (keep or work) / f"{name}_seed{seed}"
            runs[name][str(seed)] = train_once(manifest, out, mode, lora, seed, args)
            print(f"seed {seed} {name}: {runs[name][str(seed)]}", file=sys.stderr, flush=True)
            section.update(load_after=_load(), summary=auc_summary(runs), runs=runs)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    section["complete"] = True
    return section


def merge_reports(paths: list[str]) -> dict:
    """One ``auc`` summary over the runs of several reports (same settings, e.g. one seed each)."""
    sections = [json.loads(Path(p).read_text(encoding="utf-8"))["auc"] for p in paths]
    keys = ("backbone", "cases", "views", "pixels", "fov_mm", "epochs", "batch_size")
    differing = [k for k in keys if len({json.dumps(s.get(k)) for s in sections}) > 1]
    if differing:
        raise SystemExit(f"--merge: the reports differ in {differing}; only runs of one setting can be merged")
    runs: dict[str, dict[str, dict]] = {}
    for section in sections:
        for name, per_seed in section.get("runs", {}).items():
            for seed, run in per_seed.items():
                if seed in runs.setdefault(name, {}):
                    raise SystemExit(f"--merge: {name} seed {seed} appears in more than one report")
                runs[name][seed] = run
    return {**{k: sections[0].get(k) for k in (*keys, "weights")}, "merged_from": paths,
            "lr": sorted({s.get("lr") for s in sections}),
            "complete": all(s.get("complete") for s in sections), "summary": auc_summary(runs), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="step,auc", help="comma-separated: step, auc")
    parser.add_argument("--last-n", type=int, nargs="+", default=[8, 6, 4, 3, 2],
                        help="N of the last-N-block LoRA variants (the tiny ViT uses those below 6)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the ViT-S/14 step")
    parser.add_argument("--step-pixels", type=int, default=112)
    parser.add_argument("--step-batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cases", type=int, default=64, help="phantom studies per cohort (4 nodules each)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--views", default="ortho3")
    parser.add_argument("--pixels", type=int, default=64)
    parser.add_argument("--fov-mm", type=float, default=24.0)
    parser.add_argument("--backbone", default="medlora_tiny", help="registry name of the pre-trained backbone")
    parser.add_argument("--weights", default=str(PRETRAINED_TINY),
                        help="its pre-trained weights (default: the shipped tiny ViT on synthetic CT)")
    parser.add_argument("--variants", nargs="+",
                        help="auc runs to do, in this order (default: lora_qv, lora_qv_lastN…, full)")
    parser.add_argument("--merge", nargs="+", metavar="REPORT",
                        help="summarise the auc runs of these reports as one (runs nothing)")
    parser.add_argument("--lora-lr", type=float,
                        help="peak learning rate of the LoRA runs (default: the trainer's); their names get _lrX")
    parser.add_argument("--keep-adapters", help="write the trained adapters into this folder")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.merge:
        return emit({"auc": merge_reports(args.merge)}, args.out)
    import torch

    torch.set_num_threads(args.threads)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    report: dict = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                                "torch": torch.__version__, "cpus": os.cpu_count(), "threads": args.threads},
                    "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    if "step" in sections:
        report["vits14_step"] = vits_step_times(args.last_n, args.rounds, args.step_batch, args.step_pixels)
        print(json.dumps(report["vits14_step"]), file=sys.stderr, flush=True)
    if "auc" in sections:
        auc_comparison(args, report)
    return emit(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
