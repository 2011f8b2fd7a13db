"""``medlora train``: train a LoRA adapter from a dataset manifest.

Exit codes (docs/architecture.md, "Training process"): 0 done, 2 bad input, 3 stopped on
request with a resumable checkpoint (rerun with ``--resume``), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_STOPPED = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and output")
    data.add_argument("--manifest", required=True, type=Path, help="training manifest (CSV or JSON)")
    data.add_argument("--out", required=True, type=Path, help="adapter folder to write")
    data.add_argument("--name", help="adapter name (default: the --out folder's name)")
    data.add_argument("--overwrite", action="store_true",
                      help="replace an existing --out and discard a stale checkpoint")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="dinov2_vits14", help="backbone name (default dinov2_vits14)")
    model.add_argument("--weights", type=Path, help="local backbone weights file (.safetensors)")
    model.add_argument("--random-init", "--allow-random-init", dest="random_init", action="store_true",
                       help="use a seeded random backbone when no weights are found (tests and demos only)")
    model.add_argument("--mode", choices=["lora", "full", "linear"], default="lora")
    model.add_argument("--targets", choices=["qv", "qkv", "attn", "all"], default="qv",
                       help="LoRA targets: qv = q and v of a split qkv, as MeLo / MED-PEFT (default)")
    model.add_argument("--rank", type=int, default=8)
    model.add_argument("--alpha", type=float, default=32.0)
    model.add_argument("--lora-dropout", type=float, default=0.1)
    model.add_argument("--last-n-blocks", type=int, help="adapt only the last N blocks (faster)")
    model.add_argument("--views", choices=["axial", "ortho3", "multiview9"], default="multiview9")
    model.add_argument("--fov-mm", type=float, default=50.0, help="patch edge in mm (default 50)")
    model.add_argument("--pixels", type=int, help="patch edge in pixels (default: backbone size, at most 112)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=20)
    opt.add_argument("--batch-size", type=int, default=16)
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    opt.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 lora/linear, 1e-4 full)")
    opt.add_argument("--weight-decay", type=float, default=0.05)
    opt.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear warm-up")
    opt.add_argument("--patience", type=int, default=5, help="epochs without better validation AUC before stopping")
    split = opt.add_mutually_exclusive_group()
    split.add_argument("--folds", type=int, help="K-fold cross-validation by patient, then refit on all data")
    split.add_argument("--val-fraction", type=float, default=0.2, help="holdout fraction by patient (default 0.2)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--no-augment", action="store_true", help="train on unaugmented patches")

    run_group = parser.add_argument_group("process")
    run_group.add_argument("--progress", choices=["json", "bar", "none", "auto"], default="auto",
                           help="json: one JSON event per line on stdout; bar: tqdm; auto: bar on a terminal")
    run_group.add_argument("--progress-every", type=int, default=10, help="optimizer steps between step events")
    run_group.add_argument("--resume", action="store_true", help="continue from the checkpoint of a stopped run")
    run_group.add_argument("--checkpoint-dir", type=Path, help="default: <out>.checkpoint beside --out")
    run_group.add_argument("--keep-checkpoint", action="store_true", help="keep the checkpoint after success")
    run_group.add_argument("--stop-file", type=Path, help="stop resumably when this file appears")
    run_group.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: automatic)")
    run_group.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    run_group.add_argument("--threads", type=int, help="torch CPU threads")


def build_config(args: argparse.Namespace):
    from ..models import LoraSpec
    from ..patches import PatchSpec
    from ..training.augment import AugmentConfig
    from ..training.trainer import TrainConfig

    spec = None
    if args.pixels is not None or args.views != "multiview9" or args.fov_mm != 50.0:
        pixels = args.pixels
        if pixels is None:
            from ..models import get_backbone_config
            from ..training.trainer import DEFAULT_PIXELS

            pixels = min(get_backbone_config(args.backbone).img_size, DEFAULT_PIXELS)
        spec = PatchSpec(views=args.views, fov_mm=args.fov_mm, pixels=pixels)
    lora = LoraSpec(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout, targets=args.targets,
                    last_n_blocks=args.last_n_blocks)
    return TrainConfig(
        manifest=args.manifest, out=args.out, name=args.name, backbone=args.backbone, weights=args.weights,
        random_init=args.random_init, mode=args.mode, lora=lora, patch_spec=spec, epochs=args.epochs,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
        warmup_fraction=args.warmup, patience=args.patience, folds=args.folds, val_fraction=args.val_fraction,
        seed=args.seed, augment=AugmentConfig.none() if args.no_augment else AugmentConfig(),
        num_workers=args.workers, device=args.device, progress_every=args.progress_every,
        checkpoint_dir=args.checkpoint_dir, resume=args.resume, stop_file=args.stop_file,
        overwrite=args.overwrite, keep_checkpoint=args.keep_checkpoint)


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from ..errors import MedLoRAError
    from ..training.progress import BarReporter, make_reporter
    from ..training.trainer import train

    reporter = make_reporter(args.progress, rank=int(os.environ.get("RANK", "0")))
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if isinstance(reporter, BarReporter):
            args.progress_every = 1  # a bar moves every step; JSON watchers get every N-th
        config = build_config(args)
    except MedLoRAError as exc:
        reporter.emit("error", message=str(exc), type=type(exc).__name__)
        raise
    try:
        result = train(config, reporter)
    finally:
        reporter.close()
    return EXIT_STOPPED if result.status == "stopped" else 0
