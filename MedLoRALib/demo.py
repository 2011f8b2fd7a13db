"""``medlora demo``: the whole workflow on synthetic chest CT, offline, in a few minutes.

Generate a phantom cohort, train a small LoRA adapter on it with the real trainer, score
held-out phantom studies with the real scoring engine, and write a report. The backbone is
the tiny ViT that MedLoRA pre-trained on synthetic CT (``training/pretrain.py``) — a
stand-in for a large pretrained model, not one — and every number is about phantoms.
Beside every AUC stands the shortcut baseline (logistic regression on diameter and mean
HU), which the phantoms are built to defeat: the adapter has to read shape.

Re-running with the same ``--out`` reuses the cohort and, when the settings match, the
trained adapter; an interrupted training resumes from its checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .adapters.overwrite import TRAINING_REPORTS
from .atomic import atomic_path, write_text_atomic
from .errors import MedLoRAError
from .nodule import Nodule

COHORT_STAMP = "cohort.json"
TRAIN_STAMP = ".demo-training.json"
BACKBONE = "medlora_tiny"


def _default_weights() -> Path:
    from .training.pretrain import DEFAULT_WEIGHTS

    return DEFAULT_WEIGHTS


@dataclass(frozen=True)
class DemoConfig:
    """What the demo does.

    Args:
        out: report folder (cohort, adapter and report files go inside).
        train_cases: phantom studies for training and validation (split by patient).
        heldout_cases: further phantom studies, never seen in training, that are scored.
        nodules_per_case: nodules in each phantom study (half malignant-like over the cohort).
        epochs: training epochs (early stopping may end sooner).
        batch_size: nodules per training step.
        targets: LoRA targets (``qv`` as MeLo / MED-PEFT).
        rank: LoRA rank.
        views: patch view set (``multiview9``: nine planes, each a grey image).
        seed: cohort and training seed.
        random_init: use a seeded random backbone instead of the synthetic-CT pre-trained one.
        weights: the pre-trained stand-in backbone's weights file.
        progress: ``bar`` (tqdm on stderr), ``json`` (events on stdout) or ``none``.
        threads: torch CPU threads (None: torch's default).
    """

    out: Path = Path("demo-output")
    train_cases: int = 40
    heldout_cases: int = 10
    nodules_per_case: int = 4
    epochs: int = 20
    batch_size: int = 16
    targets: str = "qv"
    rank: int = 8
    views: str = "multiview9"
    seed: int = 0
    random_init: bool = False
    weights: Path = field(default_factory=_default_weights)
    progress: str = "bar"
    threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "weights", Path(self.weights))
        problems = [f"{name} must be ≥ {low}, got {getattr(self, name)}"
                    for name, low in (("train_cases", 4), ("heldout_cases", 1), ("nodules_per_case", 2),
                                      ("epochs", 1), ("batch_size", 1)) if int(getattr(self, name)) < low]
        if self.progress not in ("bar", "json", "none"):
            problems.append(f"progress must be bar, json or none, got {self.progress!r}")
        if problems:
            raise MedLoRAError("invalid demo settings: " + "; ".join(problems))
        if not self.random_init and not self.weights.is_file():
            raise MedLoRAError(f"the pre-trained stand-in backbone {self.weights} is missing: reinstall MedLoRA, "
                               "recreate it with scripts/pretrain_tiny_backbone.py, or pass --random-init")

    @classmethod
    def quick(cls, out: Path, **changes) -> DemoConfig:
        """A reduced run for tests and a first look (well under a minute)."""
        return cls(**{"out": out, "train_cases": 6, "heldout_cases": 2, "epochs": 1, "batch_size": 8, **changes})


@dataclass
class DemoResult:
    """What the demo produced (also in ``metrics.json``)."""

    out: Path
    adapter: Path
    files: dict[str, Path]
    metrics: dict
    seconds: float


# --- small helpers --------------------------------------------------------------------------------


def _replace_atomic(path: Path, write: Callable[[str], None]) -> Path:
    """Write through ``write(temp_path)`` beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        write(str(tmp))
    return path


def _write_json(path: Path, data: dict) -> Path:
    from .training.progress import jsonable

    return write_text_atomic(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fmt_auc(auc: float, ci: tuple[float, float] | list[float]) -> str:
    if not np.isfinite(auc):
        return "n/a (one class only)"
    return f"{auc:.3f} (95% CI {ci[0]:.3f}–{ci[1]:.3f})"


def backbone_description(config: DemoConfig) -> str:
    """The sentence every demo output starts with: what the backbone really is."""
    if config.random_init:
        return (f"backbone: {BACKBONE}, RANDOMLY INITIALISED (seeded) — not pre-trained at all, and not a real "
                "large vision model")
    from .adapters.manifest import sha256_file

    return (f"backbone: {BACKBONE} (a tiny ViT, 0.7 M parameters) pre-trained by MedLoRA's own script on "
            f"synthetic CT structures ({config.weights.name}, SHA-256 {sha256_file(config.weights)[:12]}…) — a "
            "stand-in, NOT a real pretrained large vision model")


# --- the steps ------------------------------------------------------------------------------------


def ensure_cohort(folder: Path, n_cases: int, seed: int, nodules_per_case: int,
                  say: Callable[[str], None] = print) -> Path:
    """The cohort's manifest, generating the phantoms only when the folder lacks this exact cohort."""
    from .synthetic import PhantomConfig, write_cohort

    phantom = PhantomConfig(n_nodules=nodules_per_case)
    wanted = {"n_cases": n_cases, "seed": seed, "phantom": json.loads(json.dumps(asdict(phantom), default=list))}
    stamp = folder / COHORT_STAMP
    manifest = folder / "manifest.csv"
    if manifest.is_file() and _read_json(stamp) == wanted:
        say(f"reusing {n_cases} phantom studies in {folder}")
        return manifest
    if folder.exists():
        foreign = [p.name for p in folder.iterdir() if not _made_by_demo(p.name)]
        if foreign:
            raise MedLoRAError(f"{folder} holds files the demo did not write ({', '.join(sorted(foreign)[:3])}); "
                               "choose another --out")
        shutil.rmtree(folder)  # an interrupted or differently sized cohort of an earlier demo run
    started = time.perf_counter()
    manifest = write_cohort(folder, n_cases, seed, config=phantom)
    _write_json(stamp, wanted)
    say(f"generated {n_cases} phantom studies ({n_cases * nodules_per_case} nodules) in {folder} "
        f"in {time.perf_counter() - started:.1f} s")
    return manifest


def _made_by_demo(name: str) -> bool:
    return name.startswith(("SYN-", ".manifest.", f".{Path(COHORT_STAMP).stem}.")) or name in ("manifest.csv",
                                                                                                COHORT_STAMP)


def _train_config(config: DemoConfig, manifest: Path, adapter: Path):
    from .models import LoraSpec
    from .patches import PatchSpec
    from .training.trainer import TrainConfig

    return TrainConfig(manifest=manifest, out=adapter, backbone=BACKBONE,
                       weights=None if config.random_init else config.weights, random_init=config.random_init,
                       mode="lora", lora=LoraSpec(rank=config.rank, targets=config.targets),
                       patch_spec=PatchSpec(views=config.views, fov_mm=50.0, pixels=64), epochs=config.epochs,
                       batch_size=config.batch_size, patience=max(3, config.epochs), val_fraction=0.25,
                       seed=config.seed, name="demo", progress_every=5)


def _training_identity(train_config, weights: Path | None) -> dict:
    """Everything that decides the adapter: settings, the cohort's manifest and the backbone file."""
    from .adapters.manifest import sha256_file

    return {**train_config.identity(), "manifest_sha256": sha256_file(train_config.manifest),
            "weights_sha256": sha256_file(weights) if weights else None}


def ensure_adapter(config: DemoConfig, manifest: Path, data, say: Callable[[str], None] = print):
    """Train the adapter, resume an interrupted training, or reuse a finished one with the same settings."""
    from .training.checkpoint import has_checkpoint
    from .training.progress import make_reporter
    from .training.trainer import train

    adapter = config.out / "adapter"
    train_config = _train_config(config, manifest, adapter)
    identity = _training_identity(train_config, train_config.weights)
    stamp = config.out / TRAIN_STAMP
    saved = _read_json(stamp)
    if (adapter / "manifest.json").is_file() and saved is not None and saved.get("identity") == identity:
        say(f"reusing the adapter trained earlier in {adapter} (same cohort and settings)")
        return adapter, saved["metrics"], saved["elapsed_s"]
    resume = has_checkpoint(train_config.checkpoint_folder) and saved is not None and saved.get("identity") == identity
    train_config = replace(train_config, resume=resume, overwrite=not resume)
    say(("resuming the interrupted training" if resume else "training a LoRA adapter") +
        f" ({config.targets}, rank {config.rank}, {config.epochs} epochs, batch {config.batch_size})")
    _write_json(stamp, {"identity": identity, "metrics": None, "elapsed_s": None})
    reporter = make_reporter(config.progress)
    try:
        result = train(train_config, reporter, data=data)
    finally:
        reporter.close()
    if result.status != "done":
        raise MedLoRAError(f"training stopped before the end; run the demo again with the same --out to resume "
                           f"(checkpoint {result.checkpoint})")
    elapsed = (_read_json(adapter / "metrics.json") or {}).get("training", {}).get("elapsed_s")
    _write_json(stamp, {"identity": identity, "metrics": result.metrics, "elapsed_s": elapsed})
    return adapter, result.metrics, elapsed


def shortcut_probabilities(train_features: np.ndarray, train_labels: np.ndarray,
                           test_features: np.ndarray) -> np.ndarray:
    """Logistic regression on (diameter, mean HU), fitted on one set, applied to another."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression())
    model.fit(np.asarray(train_features, dtype=float), np.asarray(train_labels, dtype=int))
    return model.predict_proba(np.asarray(test_features, dtype=float))[:, 1]


def training_shortcut_features(data) -> np.ndarray:
    """(N, 2) diameter and mean HU of every training-cohort nodule, from the images held in memory."""
    from .synthetic import shortcut_features

    by_image: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(data.samples):
        by_image[sample.image_key].append(index)
    features = np.zeros((len(data.samples), 2))
    for key, indices in by_image.items():
        nodules = [Nodule(centre_lps=data.samples[i].centre_lps, nodule_id=data.samples[i].nodule_id,
                          diameter_mm=data.samples[i].diameter_mm) for i in indices]
        features[indices] = shortcut_features(data.images[key], nodules)
    return features


def score_heldout(adapter: Path, manifest: Path, weights: Path | None,
                  relative_to: Path | None = None) -> tuple[list[dict], np.ndarray, float]:
    """Score every held-out nodule with the scoring engine.

    Returns the result rows, the nodules' shortcut features and the adapter's threshold.
    """
    from .ctio import load_ct
    from .engine import ScoringEngine
    from .synthetic import shortcut_features
    from .training.manifest import read_rows

    rows, problems = read_rows(manifest)
    if problems:
        raise MedLoRAError(f"held-out manifest {manifest} has problems: " + "; ".join(problems[:5]))
    by_image: dict[Path, list] = defaultdict(list)
    for row in rows:
        by_image[row.image].append(row)
    engine = ScoringEngine(device="cpu")
    engine.attach_adapter(adapter, weights=weights)
    results, features = [], []
    for image_path, image_rows in by_image.items():
        image = load_ct(image_path)
        nodules = [Nodule(centre_lps=r.centre_lps, nodule_id=r.nodule_id, case_id=r.patient_id,
                          diameter_mm=r.diameter_mm, label=r.label) for r in image_rows]
        features.append(shortcut_features(image, nodules))
        for nodule, scored in zip(nodules, engine.score(image, nodules)):
            results.append({"case_id": nodule.case_id, "nodule_id": nodule.nodule_id,
                            "image": os.path.relpath(image_path, relative_to) if relative_to else str(image_path),
                            "x_lps": nodule.centre_lps[0], "y_lps": nodule.centre_lps[1],
                            "z_lps": nodule.centre_lps[2], "diameter_mm": nodule.diameter_mm,
                            "true_label": nodule.label, "probability": scored["probability"],
                            "predicted": scored["label"], "logit": scored["logit"]})
    return results, np.concatenate(features), float(engine.manifest().threshold)


# --- reports --------------------------------------------------------------------------------------

RESULT_COLUMNS = ("case_id", "nodule_id", "image", "x_lps", "y_lps", "z_lps", "diameter_mm", "true_label",
                  "probability", "predicted", "shortcut_probability")


def write_results_csv(path: Path, rows: list[dict]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})

    return _replace_atomic(path, write)


def plot_heldout_roc(path: Path, labels: np.ndarray, probabilities: np.ndarray, shortcut: np.ndarray,
                     aucs: dict) -> Path:
    """The adapter's ROC and the shortcut baseline's, on the held-out phantoms."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(4.8, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for scores, name, colour in ((probabilities, "LoRA adapter", "C0"), (shortcut, "shortcut: diameter + mean HU", "C3")):
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, lw=2, c=colour, label=f"{name}: AUC {aucs[name]:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title=f"Held-out SYNTHETIC phantoms (n={len(labels)}, {int(np.sum(labels))} malignant-like)")
    ax.legend(loc="lower right", fontsize=7)
    return _replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))


def _auc_with_ci(labels: np.ndarray, scores: np.ndarray, seed: int) -> dict:
    from .training.metrics import bootstrap_auc_ci, roc_auc

    return {"auc": roc_auc(labels, scores), "auc_ci95": list(bootstrap_auc_ci(labels, scores, seed=seed))}


# --- the whole demo -------------------------------------------------------------------------------


def run_demo(config: DemoConfig, say: Callable[[str], None] | None = None) -> DemoResult:
    """Cohort → training → held-out scoring → report; every step reused when already done."""
    import torch

    from .training.augment import AugmentConfig, patch_reach_mm
    from .training.manifest import check_training_set
    from .training.metrics import evaluate
    from .training.splits import holdout_split

    if say is None:
        stream = sys.stderr if config.progress == "json" else sys.stdout
        def say(text: str) -> None:
            print(text, file=stream, flush=True)
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    say("MedLoRA demo — SYNTHETIC data only: every number below is about computer-generated phantoms, not patients.")
    say(backbone_description(config))

    train_manifest = ensure_cohort(out / "cohort" / "train", config.train_cases, config.seed,
                                   config.nodules_per_case, say)
    heldout_manifest = ensure_cohort(out / "cohort" / "heldout", config.heldout_cases, config.seed + 1_000_003,
                                     config.nodules_per_case, say)

    train_config = _train_config(config, train_manifest, out / "adapter")
    data = check_training_set(train_manifest, reach_mm=patch_reach_mm(train_config.patch_spec, AugmentConfig()))
    adapter, train_metrics, train_seconds = ensure_adapter(config, train_manifest, data, say)

    # The trainer's validation split, recomputed: same function, same samples, same seed.
    split = holdout_split(data.patient_ids, data.labels, train_config.val_fraction, train_config.seed)
    features = training_shortcut_features(data)
    labels = data.labels
    val_shortcut = shortcut_probabilities(features[split.train], labels[split.train], features[split.val])
    validation = {"adapter": {k: train_metrics[k] for k in ("n", "n_positive", "auc", "auc_ci95")},
                  "shortcut_baseline": _auc_with_ci(labels[split.val], val_shortcut, config.seed)}
    say(f"validation ({validation['adapter']['n']} nodules): AUC {_fmt_auc(train_metrics['auc'], train_metrics['auc_ci95'])}"
        f"  |  shortcut baseline (diameter + mean HU) AUC "
        f"{_fmt_auc(validation['shortcut_baseline']['auc'], validation['shortcut_baseline']['auc_ci95'])}")

    say(f"scoring {config.heldout_cases} held-out phantom studies with the scoring engine")
    rows, heldout_features, threshold = score_heldout(adapter, heldout_manifest,
                                                      None if config.random_init else config.weights, out)
    heldout_labels = np.array([r["true_label"] for r in rows], dtype=int)
    probabilities = np.array([r["probability"] for r in rows])
    shortcut = shortcut_probabilities(features, labels, heldout_features)
    for row, p in zip(rows, shortcut):
        row["shortcut_probability"] = float(p)
    logits = np.log(probabilities) - np.log1p(-probabilities)  # the engine's calibrated logits
    heldout_model = evaluate(heldout_labels, logits, temperature=1.0, threshold=threshold, seed=config.seed)
    heldout_shortcut = _auc_with_ci(heldout_labels, shortcut, config.seed)
    say(f"held-out ({len(rows)} nodules): AUC {_fmt_auc(heldout_model.auc, heldout_model.auc_ci95)}  |  shortcut "
        f"baseline (diameter + mean HU) AUC {_fmt_auc(heldout_shortcut['auc'], heldout_shortcut['auc_ci95'])}")

    files = {"results": write_results_csv(out / "results.csv", rows)}
    files["roc"] = plot_heldout_roc(out / "roc.png", heldout_labels, probabilities, shortcut,
                                    {"LoRA adapter": heldout_model.auc,
                                     "shortcut: diameter + mean HU": heldout_shortcut["auc"]})
    seconds = time.perf_counter() - started
    metrics = {
        "synthetic_data": True,
        "backbone": {"name": BACKBONE, "random_init": config.random_init,
                     "weights": None if config.random_init else str(config.weights),
                     "description": backbone_description(config)},
        "budget": {"train_cases": config.train_cases, "heldout_cases": config.heldout_cases,
                   "nodules_per_case": config.nodules_per_case, "epochs": config.epochs,
                   "batch_size": config.batch_size, "lora_targets": config.targets, "lora_rank": config.rank,
                   "views": config.views, "seed": config.seed},
        "validation": validation,
        "heldout": {"adapter": heldout_model.to_dict(), "shortcut_baseline": heldout_shortcut},
        "training_seconds": train_seconds,
        "total_seconds": round(seconds, 1),
    }
    files["metrics"] = _write_json(out / "metrics.json", metrics)
    files["summary"] = write_text_atomic(out / "summary.txt", summary_text(config, metrics, adapter))
    for name in TRAINING_REPORTS:  # what medlora train wrote beside the adapter
        if (adapter / name).is_file():
            files[f"adapter/{name}"] = adapter / name
    say("wrote " + ", ".join(str(p.relative_to(out)) for p in files.values()) + f" in {out}")
    say(f"demo finished in {seconds:.0f} s (synthetic data, {'random' if config.random_init else 'stand-in'} backbone: "
        "not a clinical result)")
    return DemoResult(out=out, adapter=adapter, files=files, metrics=metrics, seconds=seconds)


def summary_text(config: DemoConfig, metrics: dict, adapter: Path) -> str:
    """The plain-text report."""
    val, held = metrics["validation"], metrics["heldout"]
    budget = metrics["budget"]
    lines = [
        "MedLoRA demo report — SYNTHETIC DATA, NOT A CLINICAL RESULT",
        "",
        backbone_description(config) + ".",
        ("Data: computer-generated chest CT phantoms. Benign-like and malignant-like nodules share one size range "
         "and one mean-density distribution, so only shape (lobulation, spiculation, margin, part-solid texture) "
         "separates them; the shortcut baseline (logistic regression on diameter and mean HU) shows how far size "
         "and density alone get."),
        "",
        (f"Budget: {budget['train_cases']} training studies × {budget['nodules_per_case']} nodules (25% of patients "
         f"held for validation), {budget['epochs']} epochs, batch {budget['batch_size']}, LoRA "
         f"{budget['lora_targets']} rank {budget['lora_rank']}, {budget['views']} patches of 50 mm at 64 px, "
         f"seed {budget['seed']}."),
        "",
        (f"Validation ({val['adapter']['n']} nodules):  adapter AUC "
         f"{_fmt_auc(val['adapter']['auc'], val['adapter']['auc_ci95'])};  shortcut baseline AUC "
         f"{_fmt_auc(val['shortcut_baseline']['auc'], val['shortcut_baseline']['auc_ci95'])}"),
        (f"Held-out ({held['adapter']['n']} nodules in {budget['heldout_cases']} unseen studies):  adapter AUC "
         f"{_fmt_auc(held['adapter']['auc'], held['adapter']['auc_ci95'])};  shortcut baseline AUC "
         f"{_fmt_auc(held['shortcut_baseline']['auc'], held['shortcut_baseline']['auc_ci95'])}"),
        (f"At the adapter's threshold: sensitivity {held['adapter']['sensitivity']:.2f}, "
         f"specificity {held['adapter']['specificity']:.2f} (held-out)."),
        "",
        f"Training took {metrics['training_seconds'] or 0:.0f} s; the whole demo {metrics['total_seconds']:.0f} s.",
        "",
        ("Files: results.csv (one row per held-out nodule: LPS centre, truth, probability, shortcut probability), "
         "metrics.json, roc.png (held-out ROC with the shortcut baseline), summary.txt; "
         f"{adapter.name}/ holds the adapter with the trainer's own reports (metrics.json, roc.png, "
         "calibration.png, training_curves.png)."),
    ]
    return "\n".join(lines) + "\n"
