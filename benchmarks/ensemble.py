"""Several sites, one answer: single adapters vs their ensemble vs their merged adapters (synthetic cohort).

Each site has its own phantom cohort (disjoint patients) made with its own scanner settings
(voxel spacing, slice thickness, noise) and trains its own LoRA adapter through the real
trainer (``training.trainer.train``) with its own seed, on the tiny ViT pre-trained on
synthetic CT (``MedLoRALib/assets/medlora_tiny_synthct.safetensors``). Every adapter is then
scored by the scoring engine on one common held-out test set drawn from all sites (studies
no adapter saw), and compared with

* the **ensemble**: ``MedLoRALib.ensemble.combine`` on the adapters' probabilities
  (mean probability, spread = their standard deviation);
* the **merged** adapters of ``MedLoRALib.adapters.merge`` (``avg`` and ``ties``), each one
  ordinary adapter.

Reported per model: ROC AUC with a bootstrap 95% interval (``training.metrics``), expected
calibration error (10 bins) and the error rate at the model's threshold; for the ensemble,
the AUROC of its spread for telling misclassified nodules from correct ones (beside the
AUROC of the simpler "closeness to the threshold" signal, which any single model has), and
the shortcut baseline (logistic regression on diameter and mean HU, fitted on all sites'
training nodules).

Everything is cached under ``--work`` (cohorts, trained adapters, training checkpoints), so
an interrupted run resumes: rerun the same command.

    HF_HUB_OFFLINE=1 python benchmarks/ensemble.py [--work /tmp/medlora-bench-ensemble]
        [--train-cases 24] [--test-cases 8] [--epochs 16] [--threads 1] [--tta] [--train-only] [--out results.json]

Prints one JSON object (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _report import emit  # noqa: E402  (benchmarks/_report.py)

BACKBONE = "medlora_tiny"
EXTENT_MM = (172.8, 144.0, 160.0)  # the default phantom's field of view; each site keeps it


@dataclass(frozen=True)
class Site:
    """One site's scanner: in-plane pixel size, slice spacing and image noise."""

    name: str
    spacing: tuple[float, float, float]
    noise_hu: float


SITES = (Site("site-thin", (0.7, 0.7, 1.25), 12.0),
         Site("site-standard", (0.9, 0.9, 2.5), 20.0),
         Site("site-thick-noisy", (1.0, 1.0, 3.0), 40.0))


def _set_threads(threads: int) -> None:
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    from MedLoRALib.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# --- cohorts and training -------------------------------------------------------------------------


def phantom_config(site: Site):
    from MedLoRALib.synthetic import PhantomConfig

    size = tuple(int(round(e / s)) for e, s in zip(EXTENT_MM, site.spacing))
    return PhantomConfig(size=size, spacing=site.spacing, noise_hu=site.noise_hu)


def ensure_cohort(folder: Path, site: Site, cases: int, seed: int) -> Path:
    """The cohort's manifest; generated only when ``folder`` lacks this exact cohort."""
    from MedLoRALib.synthetic import write_cohort

    wanted = json.loads(json.dumps({"cases": cases, "seed": seed, "site": asdict(site)}))  # tuples as JSON lists
    stamp, manifest = folder / "cohort.json", folder / "manifest.csv"
    if manifest.is_file() and _read_json(stamp) == wanted:
        return manifest
    started = time.perf_counter()
    manifest = write_cohort(folder, cases, seed, config=phantom_config(site))
    _write_json(stamp, wanted)
    print(f"[ensemble] {site.name}: {cases} phantom studies in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)
    return manifest


def train_config(manifest: Path, out: Path, seed: int, args):
    from MedLoRALib.models import LoraSpec
    from MedLoRALib.patches import PatchSpec
    from MedLoRALib.training.trainer import TrainConfig

    return TrainConfig(manifest=manifest, out=out, name=out.name, backbone=BACKBONE, weights=args.weights,
                       mode="lora", lora=LoraSpec(rank=8, targets="qv"),
                       patch_spec=PatchSpec(views="multiview9", fov_mm=50.0, pixels=64), epochs=args.epochs,
                       batch_size=16, patience=args.epochs, val_fraction=0.25, seed=seed, threads=args.threads,
                       progress_every=50)


def ensure_adapter(config, reuse_stamp: Path) -> tuple[Path, float]:
    """Train the site's adapter, resume its interrupted training, or reuse the finished one."""
    from MedLoRALib.adapters.manifest import sha256_file
    from MedLoRALib.training.checkpoint import has_checkpoint
    from MedLoRALib.training.progress import Reporter
    from MedLoRALib.training.trainer import train

    identity = json.loads(json.dumps({**config.identity(), "manifest_sha256": sha256_file(config.manifest)},
                                     default=str))
    saved = _read_json(reuse_stamp)
    if (config.out / "manifest.json").is_file() and saved and saved.get("identity") == identity:
        return config.out, float(saved["elapsed_s"])
    resume = has_checkpoint(config.checkpoint_folder) and bool(saved) and saved.get("identity") == identity
    _write_json(reuse_stamp, {"identity": identity, "elapsed_s": None})
    print(f"[ensemble] {'resuming' if resume else 'training'} {config.out.name}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = train(replace(config, resume=resume, overwrite=not resume), Reporter())
    if result.status != "done":
        raise SystemExit(f"training of {config.out.name} stopped; rerun to resume")
    elapsed = time.perf_counter() - started
    _write_json(reuse_stamp, {"identity": identity, "elapsed_s": elapsed})
    print(f"[ensemble] {config.out.name}: validation AUC {result.metrics.get('auc'):.3f} in {elapsed:.0f} s",
          file=sys.stderr, flush=True)
    return config.out, elapsed


# --- scoring and metrics --------------------------------------------------------------------------


def score_all(adapters: dict[str, Path], manifests: list[Path], weights: Path,
              tta: bool) -> tuple[dict, np.ndarray, list, dict]:
    """Probabilities of every test nodule under every adapter, through the scoring engine."""
    from MedLoRALib.ctio import load_ct
    from MedLoRALib.engine import ScoringEngine
    from MedLoRALib.nodule import Nodule
    from MedLoRALib.training.manifest import read_rows

    engine = ScoringEngine(device="cpu")
    for name, path in adapters.items():
        engine.attach_adapter(path, name=name, weights=weights)
    probabilities: dict[str, list[float]] = {name: [] for name in adapters}
    labels, sites = [], []
    for manifest in manifests:
        rows, problems = read_rows(manifest)
        if problems:
            raise SystemExit(f"test manifest {manifest}: {problems[:3]}")
        by_image: dict[Path, list] = {}
        for row in rows:
            by_image.setdefault(row.image, []).append(row)
        for image_path, image_rows in by_image.items():
            image = load_ct(image_path)
            nodules = [Nodule(centre_lps=r.centre_lps, nodule_id=r.nodule_id, case_id=r.patient_id)
                       for r in image_rows]
            for name in adapters:
                probabilities[name] += [s["probability"] for s in engine.score(image, nodules, adapter=name, tta=tta)]
            labels += [int(r.label) for r in image_rows]
            sites += [manifest.parent.parent.name] * len(image_rows)
    thresholds = {name: float(engine.manifest(name).threshold) for name in adapters}
    return {name: np.asarray(p) for name, p in probabilities.items()}, np.asarray(labels), sites, thresholds


def model_metrics(labels: np.ndarray, probability: np.ndarray, threshold: float, seed: int) -> dict:
    from MedLoRALib.training.metrics import bootstrap_auc_ci, expected_calibration_error, roc_auc

    wrong = (probability >= threshold) != (labels == 1)
    return {"auc": round(roc_auc(labels, probability), 4),
            "auc_ci95": [round(v, 4) for v in bootstrap_auc_ci(labels, probability, seed=seed)],
            "ece": round(expected_calibration_error(labels, probability), 4),
            "threshold": round(threshold, 4), "errors": int(wrong.sum()), "error_rate": round(float(wrong.mean()), 4)}


def uncertainty_metrics(labels: np.ndarray, ensemble, seed: int) -> dict:
    """Does the spread between adapters find the ensemble's mistakes? AUROC of spread for 'misclassified'."""
    from MedLoRALib.training.metrics import bootstrap_auc_ci, roc_auc

    wrong = ((ensemble.probability >= ensemble.threshold) != (labels == 1)).astype(int)
    margin = -np.abs(ensemble.probability - ensemble.threshold)  # closer to the threshold = less sure
    out = {"misclassified": int(wrong.sum()), "nodules": int(wrong.size),
           "disagreements": int(ensemble.disagree.sum()),
           "errors_among_disagreements": int(wrong[ensemble.disagree].sum())}
    for name, signal in (("spread", ensemble.spread), ("closeness_to_threshold", margin)):
        out[f"auroc_{name}"] = round(roc_auc(wrong, signal), 4)
        out[f"auroc_{name}_ci95"] = [round(v, 4) for v in bootstrap_auc_ci(wrong, signal, seed=seed)]
    return out


def paired_auc_differences(labels: np.ndarray, scores: dict[str, np.ndarray], pairs: list[tuple[str, str]],
                           seed: int, n_boot: int = 2000) -> dict:
    """AUC(first) − AUC(second) on the same nodules, with a paired percentile-bootstrap 95% interval."""
    from MedLoRALib.training.metrics import both_classes, roc_auc

    rng = np.random.default_rng(seed)
    draws = [idx for idx in (rng.integers(0, labels.size, labels.size) for _ in range(n_boot))
             if both_classes(labels[idx])]
    out = {}
    for first, second in pairs:
        diffs = [roc_auc(labels[i], scores[first][i]) - roc_auc(labels[i], scores[second][i]) for i in draws]
        out[f"{first} - {second}"] = {
            "difference": round(roc_auc(labels, scores[first]) - roc_auc(labels, scores[second]), 4),
            "ci95": [round(float(v), 4) for v in np.quantile(diffs, [0.025, 0.975])]}
    return out


def shortcut_baseline(train_manifests: list[Path], test_manifests: list[Path], seed: int) -> dict:
    """Logistic regression on (diameter, mean HU) fitted on all sites' training nodules, on the test set."""
    from MedLoRALib.demo import shortcut_probabilities, training_shortcut_features
    from MedLoRALib.training.manifest import check_training_set
    from MedLoRALib.training.metrics import bootstrap_auc_ci, roc_auc

    def features(manifests):
        sets = [check_training_set(m, reach_mm=0.0) for m in manifests]
        return (np.concatenate([training_shortcut_features(s) for s in sets]),
                np.concatenate([s.labels for s in sets]))

    x_train, y_train = features(train_manifests)
    x_test, y_test = features(test_manifests)
    p = shortcut_probabilities(x_train, y_train, x_test)
    return {"auc": round(roc_auc(y_test, p), 4), "auc_ci95": [round(v, 4) for v in bootstrap_auc_ci(y_test, p, seed=seed)]}


# --- the run --------------------------------------------------------------------------------------


def run(args) -> dict:
    work = args.work
    sites = SITES[:args.sites]
    started = time.perf_counter()
    train_manifests, test_manifests, adapters, train_s = [], [], {}, {}
    for index, site in enumerate(sites):
        folder = work / site.name
        train_manifests.append(ensure_cohort(folder / "train", site, args.train_cases, args.seed + 101 * index))
        test_manifests.append(ensure_cohort(folder / "test", site, args.test_cases, args.seed + 101 * index + 50_000))
    cohorts_s = time.perf_counter() - started
    for index, site in enumerate(sites):
        config = train_config(train_manifests[index], work / "adapters" / site.name, args.seed + index + 1, args)
        adapters[site.name], train_s[site.name] = ensure_adapter(config, work / "adapters" / f"{site.name}.stamp.json")
    report = {"cohorts_s": round(cohorts_s, 1), "training_s": {k: round(v, 1) for k, v in train_s.items()}}
    if args.train_only:
        return report

    from MedLoRALib.adapters.archive import read_checked
    from MedLoRALib.adapters.merge import lora_updates, merge_adapters
    from MedLoRALib.ensemble import combine

    parents = list(adapters.values())
    ranks = [read_checked(p).manifest.lora["rank"] for p in parents]
    width = min(next(iter(lora_updates(read_checked(parents[0])).values())).shape)
    # at the parents' rank (what a user gets by default), and at ranks where no SVD truncation happens
    variants = {"merged-avg": ("avg", None), "merged-ties": ("ties", None),
                f"merged-avg-r{sum(ranks)}": ("avg", sum(ranks)), f"merged-ties-r{width}": ("ties", width)}
    merged, merge_s = {}, {}
    for name, (method, rank) in variants.items():
        begin = time.perf_counter()
        merged[name] = merge_adapters(parents, work / "merged" / name, method=method, density=args.density,
                                      rank=rank, name=name, overwrite=True)
        merge_s[name] = round(time.perf_counter() - begin, 2)
    begin = time.perf_counter()
    probabilities, labels, test_sites, thresholds = score_all({**adapters, **merged}, test_manifests, args.weights,
                                                                  args.tta)
    scoring_s = time.perf_counter() - begin

    singles = list(adapters)
    models = {name: model_metrics(labels, probabilities[name], thresholds[name], args.seed) for name in singles}
    stacked = np.stack([probabilities[name] for name in singles])
    ensemble = combine(stacked, [thresholds[name] for name in singles])
    models["ensemble (mean of the adapters)"] = model_metrics(labels, ensemble.probability, ensemble.threshold,
                                                              args.seed)
    for name in merged:
        models[name] = model_metrics(labels, probabilities[name], thresholds[name], args.seed)
    for name in singles:
        models[name]["own_validation_auc"] = round(float(read_checked(adapters[name]).manifest.metrics["auc"]), 4)
        wrong = ((probabilities[name] >= thresholds[name]) != (labels == 1)).astype(int)
        closeness = -np.abs(probabilities[name] - thresholds[name])
        models[name]["auroc_closeness_to_threshold_for_its_errors"] = round(_auc(wrong, closeness), 4)
    per_site = {}
    for site in sites:
        inside = np.array([s == site.name for s in test_sites])
        per_site[site.name] = {name: round(float(_auc(labels[inside], p[inside])), 4)
                               for name, p in [*probabilities.items(), ("ensemble", ensemble.probability)]}
    merge_info = {name: json.loads((path / "manifest.json").read_text())["merge"] for name, path in merged.items()}
    report.update({
        "test_set": {"nodules": int(labels.size), "malignant": int(labels.sum()),
                     "per_site": {s.name: int(sum(t == s.name for t in test_sites)) for s in sites}},
        "models": models,
        "ensemble_uncertainty": uncertainty_metrics(labels, ensemble, args.seed),
        "auc_differences": paired_auc_differences(
            labels, {**probabilities, "ensemble": ensemble.probability},
            [("ensemble", "merged-avg"), ("ensemble", "merged-ties"), ("merged-avg", "merged-ties"),
             *(("ensemble", name) for name in singles), *(("merged-avg", name) for name in singles)], args.seed),
        "auc_per_test_site": per_site,
        "shortcut_baseline": shortcut_baseline(train_manifests, test_manifests, args.seed),
        "merge": {name: {k: info.get(k) for k in ("method", "density", "rank", "relative_truncation_error")}
                  for name, info in merge_info.items()},
        "merge_s": merge_s, "scoring_s": round(scoring_s, 1),
    })
    return report


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from MedLoRALib.training.metrics import roc_auc

    return roc_auc(labels, scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medlora-bench-ensemble",
                        help="cache folder: cohorts, adapters, checkpoints (reused when rerun)")
    parser.add_argument("--sites", type=int, default=len(SITES), choices=range(2, len(SITES) + 1))
    parser.add_argument("--train-cases", type=int, default=24, help="phantom studies per site for training")
    parser.add_argument("--test-cases", type=int, default=8, help="held-out phantom studies per site")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.5, help="TIES density")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, help="pre-trained tiny backbone (default: the shipped one)")
    parser.add_argument("--tta", action="store_true",
                        help="score with the engine's 8-fold test-time augmentation (8× the scoring time)")
    parser.add_argument("--train-only", action="store_true", help="make the cohorts and adapters, then stop")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    _set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    if args.weights is None:
        from MedLoRALib.training.pretrain import DEFAULT_WEIGHTS

        args.weights = DEFAULT_WEIGHTS
    started = time.perf_counter()
    report = {"benchmark": "ensemble", "command": "python benchmarks/ensemble.py " + " ".join(sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
                          "torch": torch.__version__},
              "sites": [{**asdict(s), "size": phantom_config(s).size} for s in SITES[:args.sites]],
              "budget": {"train_cases_per_site": args.train_cases, "test_cases_per_site": args.test_cases,
                         "epochs": args.epochs, "lora": "qv r8", "patch": "multiview9 50 mm 64 px",
                         "test_time_augmentation": args.tta}}
    report.update(run(args))
    report["seconds"] = round(time.perf_counter() - started, 1)
    return emit(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
