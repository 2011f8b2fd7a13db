"""LoRA vs full fine-tuning vs linear probe on the synthetic cohort: cost and AUC side by side.

The papers' comparison (Veasey & Amini 2025: LoRA needs 36.5% less training time than full
fine-tuning; MeLo / MED-PEFT: a fraction of a percent of the parameters) on one backbone —
the tiny ViT pre-trained on synthetic CT (``training/pretrain.py``), adapted to malignancy —
with one budget: the same pre-cut augmented patches in the same order, epochs, batch size,
warm-up + cosine AdamW and class weighting as ``medlora train`` (each mode at the trainer's
default learning rate). Variants:

* ``lora_qv`` (split qkv, q and v: MeLo / MED-PEFT; LoRA dropout 0.1 as MED-PEFT),
  ``lora_qv_nodrop`` (the same without LoRA dropout) and ``lora_all`` (qkv, proj, fc1, fc2);
* ``lora_qv_last{N}``: LoRA on the last N blocks only; the frozen lower blocks run under
  ``torch.no_grad()``, so no backward pass goes below them;
* ``full`` fine-tuning and ``linear`` probe (head only, patches through the frozen backbone
  every epoch); ``linear_cached``: the probe trained on features the frozen backbone computed
  once (unaugmented patches), its feature pass counted in its time;
* ``lora_qv_random``: LoRA on a *randomly initialised* backbone — what the pre-training is worth.

Per variant: trainable parameters, training time per epoch (wall and process CPU, the loop
only; variants are interleaved epoch by epoch so machine load hits all alike), peak memory
of a training step (peak RSS of a separate process over its RSS before the step; the
benchmark runs on the CPU), and validation ROC AUC with a bootstrap 95% interval at the last
epoch (no early stopping: same budget) and at the best epoch — beside the shortcut baseline
(logistic regression on diameter and mean HU) on the same validation nodules.

A second part times one training step of DINOv2 ViT-S/14 at 112 px, batch 16 (random init):
full fine-tuning vs peft LoRA r=8 on every block's fused qkv (LoRA dropout 0.1, and 0 — peft's
default), on the last 6/4/2 blocks (dropout 0), and the faithful split-qkv q/v form
(DESIGN.md's step-time table).

    HF_HUB_OFFLINE=1 python benchmarks/lora_vs_full.py [--cases 40] [--epochs 12] [--threads 2]
        [--variants lora_qv,full,...] [--no-memory] [--no-vits] [--out results.json]

One seed's validation set is 40 nodules, whose AUC moves by ±0.1 from sampling alone, so
``--seeds 0,1,2,3,4`` repeats the comparison with a new cohort, patient-level split, patch stream
and initialisation per seed (variants default to LoRA qv, LoRA all, LoRA qv on the last 4
blocks, full, cached linear probe; validation at the last epoch only; no memory probes) and
reports per arm the mean, SD and range over seeds and, per pair of arms, the paired per-seed
differences (``benchmarks/_seed_stats.py``). Each finished seed is written to ``--seeds-file``
at once and skipped when the same command runs again.

Prints one JSON object (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from _report import emit  # noqa: E402  (benchmarks/_report.py)

BACKBONE = "medlora_tiny"
ALL_VARIANTS = ("lora_qv", "lora_qv_nodrop", "lora_all", "lora_qv_last2", "lora_qv_last3", "lora_qv_last4", "full", "linear",
                "linear_cached", "lora_qv_random")
VITS_VARIANTS = ("full", "lora_qkv_all", "lora_qkv_all_nodrop", "lora_qkv_last6_nodrop", "lora_qkv_last4_nodrop",
                 "lora_qkv_last2_nodrop", "lora_qv_all")


def _set_threads(threads: int) -> None:
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0); False if not allowed.

    ``ru_maxrss`` cannot be used: a child started by fork + exec inherits the parent's peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- models -------------------------------------------------------------------------------------


def build_variant(name: str, spec, weights: Path | None, seed: int = 0):
    """(model, mode) for a variant name; the head (and LoRA) is seeded identically for every variant."""
    import torch

    from MedLoRALib.models import LoraSpec, build_model

    torch.manual_seed(seed)
    if name.startswith("lora"):
        targets = "all" if name == "lora_all" else "qv"
        last = int(name.split("_last")[1]) if "_last" in name else None
        random_init = name.endswith("_random")
        dropout = 0.0 if name.endswith("_nodrop") else 0.1
        model, _ = build_model(BACKBONE, patch_spec=spec, mode="lora",
                               lora=LoraSpec(targets=targets, last_n_blocks=last, dropout=dropout),
                               weights=None if random_init else weights, allow_random_init=random_init,
                               pretrained=not random_init)
        return model, "lora"
    mode = "linear" if name.startswith("linear") else "full"
    model, _ = build_model(BACKBONE, patch_spec=spec, mode=mode, weights=weights)
    return model, mode


class Run:
    """One variant's training state: model, optimizer, schedule, timings and validation history."""

    def __init__(self, name: str, spec, weights: Path | None, steps_per_epoch: int, epochs: int, pos_weight: float,
                 seed: int = 0):
        import torch

        from MedLoRALib.models import trainable_parameter_count
        from MedLoRALib.training.config import DEFAULT_LR
        from MedLoRALib.training.schedule import make_optimizer

        self.name = name
        self.seed = seed
        self.model, self.mode = build_variant(name, spec, weights, seed)
        self.cached = name == "linear_cached"
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.lr = DEFAULT_LR[self.mode]
        self.optimizer, self.scheduler = make_optimizer(self.trainable, self.lr, 0.05, steps_per_epoch * epochs, 0.1)
        self.criterion = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
        self.parameters = trainable_parameter_count(self.model)
        self.epoch_wall: list[float] = []
        self.epoch_cpu: list[float] = []
        self.val_aucs: list[float] = []
        self.val_epochs: list[int] = []
        self.val_logits: list = []
        self.setup_wall = 0.0
        self.setup_cpu = 0.0
        self.features = None

    def logits(self, batch, train: bool):
        """Fused logits; ``linear_cached`` reads precomputed features instead of patches."""
        if not self.cached:
            self.model.train(train)
            return self.model(batch)
        b, v, _ = batch.shape
        return self.model.head(batch.reshape(b * v, -1)).reshape(b, v).mean(dim=1)

    def cache_features(self, patches) -> None:
        """Features of (N, views, P, P) patches through the frozen backbone, once (counted as setup)."""
        import torch

        wall, cpu = time.perf_counter(), time.process_time()
        self.model.eval()
        with torch.no_grad():
            chunks = [self.model.features(self.model._images(patches[i:i + 32]))
                      for i in range(0, len(patches), 32)]
        views = self.model.views
        self.features = torch.cat(chunks).reshape(len(patches), views, -1)
        self.setup_wall += time.perf_counter() - wall
        self.setup_cpu += time.process_time() - cpu

    def train_epoch(self, batches) -> None:
        import torch

        wall, cpu = time.perf_counter(), time.process_time()
        for step, (inputs, labels) in enumerate(batches):
            torch.manual_seed(self.seed * 1_000_003 + step)  # dropout masks: the same for every variant
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.criterion(self.logits(inputs, train=True), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
            self.optimizer.step()
            self.scheduler.step()
        self.epoch_wall.append(time.perf_counter() - wall)
        self.epoch_cpu.append(time.process_time() - cpu)

    def validate(self, patches, labels) -> None:
        import numpy as np
        import torch

        from MedLoRALib.training.metrics import roc_auc

        self.model.eval()
        with torch.no_grad():
            logits = torch.cat([self.model(patches[i:i + 32]) for i in range(0, len(patches), 32)]).numpy()
        self.val_logits.append(logits.astype(np.float64))
        self.val_aucs.append(roc_auc(labels, logits))


# --- memory probe (a separate process per variant) ------------------------------------------------


def memory_probe(name: str, batch_size: int, weights: Path | None, steps: int) -> dict:
    """Peak RSS of ``steps`` training steps over the RSS before them, in this fresh process."""
    import torch

    from MedLoRALib.patches import PatchSpec

    spec = PatchSpec(views="multiview9", fov_mm=50.0, pixels=64)
    run = Run(name, spec, weights, steps, 1, 1.0)
    generator = torch.Generator().manual_seed(0)
    patches = torch.rand((batch_size, *spec.shape), generator=generator)
    labels = (torch.arange(batch_size) % 2).float()
    reset = _reset_peak_rss()
    before = _status_mb("VmRSS")
    if run.cached:
        run.cache_features(patches)
        inputs = run.features
    else:
        inputs = patches
    run.train_epoch([(inputs, labels)] * steps)
    peak = _status_mb("VmHWM")
    return {"rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
            "peak_delta_mb": round(peak - before, 1) if reset else None,
            "peak_measured_over": "the training steps" if reset else "the whole probe process"}


def probe_in_subprocess(name: str, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, "--batch-size",
               str(args.batch_size), "--threads", str(args.threads), "--probe-steps", str(args.probe_steps)]
    if args.weights:
        command += ["--weights", str(args.weights)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- ViT-S/14 step timing -------------------------------------------------------------------------


def vits_step_times(rounds: int, batch_size: int) -> dict:
    """Median seconds of one training step per variant, variants interleaved round by round."""
    import numpy as np
    import torch

    from MedLoRALib.models import LoraSpec, build_model, trainable_parameter_count
    from MedLoRALib.patches import PatchSpec

    spec = PatchSpec(views="axial", fov_mm=50.0, pixels=112)
    lora = {"lora_qkv_all": LoraSpec(targets="qkv"), "lora_qkv_all_nodrop": LoraSpec(targets="qkv", dropout=0.0),
            **{f"lora_qkv_last{n}_nodrop": LoraSpec(targets="qkv", dropout=0.0, last_n_blocks=n) for n in (6, 4, 2)},
            "lora_qv_all": LoraSpec(targets="qv")}
    models, optimizers, counts = {}, {}, {}
    for name in VITS_VARIANTS:
        torch.manual_seed(0)
        model, _ = build_model("dinov2_vits14", patch_spec=spec, mode="full" if name == "full" else "lora",
                               lora=lora.get(name), allow_random_init=True, pretrained=False)
        model.train()
        models[name] = model
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        counts[name] = trainable_parameter_count(model)
    generator = torch.Generator().manual_seed(0)
    patches = torch.rand((batch_size, *spec.shape), generator=generator)
    labels = (torch.arange(batch_size) % 2).float()
    criterion = torch.nn.BCEWithLogitsLoss()
    wall: dict[str, list[float]] = {name: [] for name in VITS_VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VITS_VARIANTS}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name in VITS_VARIANTS:
            start, start_cpu = time.perf_counter(), time.process_time()
            optimizers[name].zero_grad(set_to_none=True)
            criterion(models[name](patches), labels).backward()
            optimizers[name].step()
            if round_index:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    full_wall, full_cpu = float(np.median(wall["full"])), float(np.median(cpu["full"]))
    return {"backbone": "dinov2_vits14 (random init)", "pixels": 112, "batch_images": batch_size, "rounds": rounds,
            "variants": {name: {"step_wall_s": round(float(np.median(wall[name])), 4),
                                "step_cpu_s": round(float(np.median(cpu[name])), 4),
                                "wall_vs_full": round(float(np.median(wall[name])) / full_wall, 3),
                                "cpu_vs_full": round(float(np.median(cpu[name])) / full_cpu, 3),
                                "trainable_parameters": counts[name][0]} for name in VITS_VARIANTS},
            "design_md_claim": {"lora_qkv_all (peft r=8)": 0.69, "last6": 0.52, "last4": 0.46, "last2": 0.37}}


# --- the comparison -------------------------------------------------------------------------------


def cohort(cases: int, seed: int, folder: Path | None) -> Path:
    from MedLoRALib.synthetic import write_cohort

    folder = folder or Path(tempfile.gettempdir()) / f"medlora-bench-cohort-{cases}-{seed}"
    manifest = folder / "manifest.csv"
    return manifest if manifest.is_file() else write_cohort(folder, cases, seed)


def compare(args, seed: int) -> dict:
    """One cohort, split, patch stream and initialisation, all drawn from ``seed``; every variant on it."""
    import numpy as np
    import torch

    from MedLoRALib.demo import shortcut_probabilities, training_shortcut_features
    from MedLoRALib.patches import PatchSpec
    from MedLoRALib.training.augment import AugmentConfig, cut_patch, patch_reach_mm, sample_rng
    from MedLoRALib.training.manifest import check_training_set
    from MedLoRALib.training.metrics import bootstrap_auc_ci, roc_auc
    from MedLoRALib.training.splits import holdout_split

    spec = PatchSpec(views="multiview9", fov_mm=50.0, pixels=64)
    augment = AugmentConfig()
    started = time.perf_counter()
    cohort_dir = args.cohort_dir / f"seed{seed}" if args.cohort_dir and args.seeds else args.cohort_dir
    manifest = cohort(args.cases, seed, cohort_dir)
    data = check_training_set(manifest, reach_mm=patch_reach_mm(spec, augment))
    labels = data.labels
    split = holdout_split(data.patient_ids, labels, 0.25, seed)
    cohort_s = time.perf_counter() - started

    def cut(index: int, epoch: int | None) -> np.ndarray:
        sample = data.samples[index]
        rng = sample_rng(seed, epoch, index) if epoch is not None else None
        return cut_patch(data.images[sample.image_key], sample.centre_lps, spec, augment if rng else None, rng)

    started = time.perf_counter()
    val_patches = torch.from_numpy(np.stack([cut(i, None) for i in split.val]))
    val_labels = labels[split.val]
    plain_train = torch.from_numpy(np.stack([cut(i, None) for i in split.train]))
    epochs = []
    for epoch in range(args.epochs):  # every variant sees the same augmented patches in the same order
        order = np.random.default_rng([seed, epoch]).permutation(len(split.train))
        patches = torch.from_numpy(np.stack([cut(int(split.train[i]), epoch) for i in order]))
        targets = torch.from_numpy(labels[split.train][order].astype(np.float32))
        epochs.append((order, patches, targets))
    cutting_s = time.perf_counter() - started

    pos_weight = float((labels[split.train] == 0).sum() / max(1, labels[split.train].sum()))
    steps_per_epoch = -(-len(split.train) // args.batch_size)
    runs = [Run(name, spec, args.weights, steps_per_epoch, args.epochs, pos_weight, seed) for name in args.variants]
    for run in runs:
        if run.cached:
            run.cache_features(plain_train)
    for epoch, (order, patches, targets) in enumerate(epochs):
        for run in runs:
            source = run.features[torch.from_numpy(order)] if run.cached else patches
            batches = [(source[i:i + args.batch_size], targets[i:i + args.batch_size])
                       for i in range(0, len(order), args.batch_size)]
            run.train_epoch(batches)
            if not args.seeds or epoch == args.epochs - 1:  # over seeds: the last epoch only (10% of the time)
                run.validate(val_patches, val_labels)
                run.val_epochs.append(epoch + 1)
            validated = f", val AUC {run.val_aucs[-1]:.3f}" if run.val_epochs[-1:] == [epoch + 1] else ""
            print(f"seed {seed} epoch {epoch + 1}/{args.epochs} {run.name}: {run.epoch_wall[-1]:.2f} s{validated}",
                  file=sys.stderr, flush=True)

    features = training_shortcut_features(data)
    shortcut = shortcut_probabilities(features[split.train], labels[split.train], features[split.val])

    def auc_ci(scores) -> dict:
        return {"auc": round(roc_auc(val_labels, scores), 4),
                "auc_ci95": [round(v, 4) for v in bootstrap_auc_ci(val_labels, scores, seed=seed)]}

    results = {}
    for run in runs:
        steady = slice(1, None) if args.epochs > 1 else slice(None)
        wall = float(np.mean(run.epoch_wall[steady]))
        cpu = float(np.mean(run.epoch_cpu[steady]))
        if run.cached:  # the one feature pass is spread over the epochs it serves
            wall += run.setup_wall / args.epochs
            cpu += run.setup_cpu / args.epochs
        best = int(np.nanargmax(run.val_aucs))
        results[run.name] = {
            "mode": run.mode, "lr": run.lr,
            "trainable_parameters": run.parameters[0], "total_parameters": run.parameters[1],
            "trainable_percent": round(100 * run.parameters[0] / run.parameters[1], 3),
            "epoch_wall_s": round(wall, 3), "epoch_cpu_s": round(cpu, 3),
            "feature_cache_s": round(run.setup_wall, 3) if run.cached else None,
            "val_last_epoch": auc_ci(run.val_logits[-1]),
            "val_best_epoch": {"epoch": run.val_epochs[best], **auc_ci(run.val_logits[best])},
            "val_auc_per_epoch": [round(a, 4) for a in run.val_aucs],
        }
    if not args.no_memory:
        for name in args.variants:
            results[name]["memory"] = probe_in_subprocess(name, args)
    reference = results.get("full")
    if reference:
        for result in results.values():
            result["epoch_wall_vs_full"] = round(result["epoch_wall_s"] / reference["epoch_wall_s"], 3)
            result["epoch_cpu_vs_full"] = round(result["epoch_cpu_s"] / reference["epoch_cpu_s"], 3)
    return {
        "seed": seed,
        "cohort": {"manifest": str(manifest), "cases": args.cases, "nodules": len(labels),
                   "train_nodules": len(split.train), "val_nodules": len(split.val),
                   "val_malignant": int(val_labels.sum()), "seconds": round(cohort_s, 1),
                   "patch_cutting_s": round(cutting_s, 1)},
        "budget": {"epochs": args.epochs, "batch_size": args.batch_size, "steps_per_epoch": steps_per_epoch,
                   "patch_spec": spec.to_dict(), "augment": augment.to_dict(), "schedule": "AdamW, 10% warm-up, cosine",
                   "lr": "trainer defaults: lora/linear 1e-3, full 1e-4"},
        "backbone": {"name": BACKBONE, "weights": str(args.weights), "pretrained_on": "synthetic CT structures"},
        "shortcut_baseline_val": auc_ci(shortcut),
        "variants": results,
    }


# --- the comparison over seeds --------------------------------------------------------------------

SEED_VARIANTS = ("lora_qv", "lora_all", "lora_qv_last4", "full", "linear_cached")


def seed_pairs(variants: list[str]) -> list[tuple[str, str]]:
    """Every arm against full fine-tuning, and the LoRA arms against each other and the cached probe."""
    pairs = [(v, "full") for v in variants if v != "full" and "full" in variants]
    wanted = [("lora_all", "lora_qv"), ("lora_qv_last4", "lora_qv"), ("lora_qv", "linear_cached"),
              ("lora_all", "linear_cached"), ("lora_qv_last4", "linear_cached")]
    return pairs + [(a, b) for a, b in wanted if a in variants and b in variants]


def seed_record(result: dict) -> dict:
    """What one seed's run keeps: cohort, shortcut baseline and, per variant, AUCs and epoch time."""
    keep = ("trainable_parameters", "epoch_wall_s", "epoch_cpu_s", "epoch_wall_vs_full", "epoch_cpu_vs_full",
            "val_last_epoch")
    return {"seed": result["seed"], "cohort": result["cohort"], "shortcut_baseline_val": result["shortcut_baseline_val"],
            "variants": {name: {k: v[k] for k in keep if k in v} for name, v in result["variants"].items()}}


def _write_json_atomically(path: Path, payload: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def run_seeds(args) -> dict:
    """``compare`` once per seed (a new cohort, split, patch stream and init each; validated at the last
    epoch only), resumable from ``--seeds-file`` (rewritten after every seed), then mean/SD/min–max per
    arm and paired differences."""
    import fcntl

    from _seed_stats import spread, summarize

    settings = {"cases": args.cases, "epochs": args.epochs, "batch_size": args.batch_size,
                "variants": list(args.variants), "weights": str(args.weights)}
    path = args.seeds_file or Path(tempfile.gettempdir()) / (
        f"medlora-lora-vs-full-seeds-{args.cases}c-{args.epochs}e-{'-'.join(args.variants)}.json")
    lock = open(path.with_name(path.name + ".lock"), "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"{path} is being written by another run (lock {lock.name}); wait for it or pass "
                         "another --seeds-file") from None
    state = {"settings": settings, "seeds": {}}
    if path.is_file():
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("settings") != settings:
            raise SystemExit(f"{path} holds seeds run with other settings ({state.get('settings')}); "
                             f"pass another --seeds-file or the same settings ({settings})")
        print(f"resuming from {path}: seeds {sorted(state['seeds'], key=int)} done", file=sys.stderr, flush=True)
    for seed in args.seeds:
        if str(seed) in state["seeds"]:
            continue
        started = time.perf_counter()
        record = seed_record(compare(args, seed))
        record["seconds"] = round(time.perf_counter() - started, 1)
        state["seeds"][str(seed)] = record
        _write_json_atomically(path, state)
        aucs = ", ".join(f"{n} {v['val_last_epoch']['auc']:.3f}" for n, v in record["variants"].items())
        print(f"seed {seed} done in {record['seconds']:.0f} s: {aucs} -> {path}", file=sys.stderr, flush=True)
    records = [state["seeds"][str(seed)] for seed in args.seeds]
    last = {v: [r["variants"][v]["val_last_epoch"]["auc"] for r in records] for v in args.variants}
    shortcut = [r["shortcut_baseline_val"]["auc"] for r in records]
    summary = summarize({**last, "shortcut": shortcut}, seed_pairs(list(args.variants)))
    time_vs_full = ({clock: {v: spread([r["variants"][v][f"epoch_{clock}_vs_full"] for r in records])
                             for v in args.variants} for clock in ("wall", "cpu")}
                    if "full" in args.variants else None)
    return {
        "seeds": list(args.seeds), "seeds_file": str(path), "settings": settings,
        "seconds_per_seed": [r["seconds"] for r in records],
        "cohorts": [{"seed": r["seed"], **r["cohort"]} for r in records],
        "val_auc_last_epoch": {**last, "shortcut": shortcut},
        "summary_last_epoch": summary,
        "epoch_time_vs_full": time_vs_full,
        "note": "paired differences: same seed's cohort, split, patches and init for both arms; survives = t "
                "interval over seeds excludes 0 and every seed has the sign of the mean; with n seeds the "
                "two-sided sign/Wilcoxon p cannot go below 2 * 0.5**n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40, help="phantom studies (4 nodules each; default 40)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", help="comma-separated seeds (e.g. 0,1,2,3,4): the comparison once per seed, "
                        "each on a new cohort and split, then mean/SD and paired differences; resumable; no "
                        "memory probes; variants default to " + ",".join(SEED_VARIANTS))
    parser.add_argument("--seeds-file", type=Path, help="per-seed results, written after each seed and resumed from "
                        "(default: a file in the temp dir named after the settings)")
    parser.add_argument("--variants", help="comma-separated subset of " + ", ".join(ALL_VARIANTS) + " (default: all)")
    parser.add_argument("--weights", type=Path, help="pre-trained tiny backbone (default: the shipped synthetic-CT one)")
    parser.add_argument("--cohort-dir", type=Path, help="cohort folder (default: a cached one in the temp dir)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory probes")
    parser.add_argument("--probe-steps", type=int, default=2)
    parser.add_argument("--no-vits", action="store_true", help="skip the ViT-S/14 step timing")
    parser.add_argument("--vits-rounds", type=int, default=5)
    parser.add_argument("--no-compare", action="store_true", help="only the ViT-S/14 step timing")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _set_threads(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    if args.weights is None:
        from MedLoRALib.training.pretrain import DEFAULT_WEIGHTS

        args.weights = DEFAULT_WEIGHTS
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.batch_size, args.weights, args.probe_steps)))
        return 0
    if args.seeds:
        try:
            args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
        if len(set(args.seeds)) != len(args.seeds):
            parser.error(f"--seeds repeats a seed: {args.seeds}")
        args.no_memory = True
    default_variants = SEED_VARIANTS if args.seeds else ALL_VARIANTS
    args.variants = [v.strip() for v in (args.variants or ",".join(default_variants)).split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(ALL_VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(ALL_VARIANTS)}")
    started = time.perf_counter()
    report = {"benchmark": "lora_vs_full", "command": "python benchmarks/lora_vs_full.py " + " ".join(sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
                          "torch": torch.__version__}}
    if not args.no_compare:
        report.update(run_seeds(args) if args.seeds else compare(args, args.seed))
    if not args.no_vits:
        report["vits14_step"] = vits_step_times(args.vits_rounds, 16)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return emit(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
