"""The GPU path, measured in one run on a CUDA machine (issue 16 §3).

1. Scoring throughput (nodules/s) through ``ScoringEngine`` on CUDA (bf16 autocast, as the
   engine does on CUDA) for ViT-S/14 and ViT-B/14 at batch 1 and 64, with and without the
   ×8 test-time augmentation, with the engine's default ``max_batch_images`` (288) and with
   one forward pass per call. Patches are pre-cut (random, the adapter's shape): cutting
   them is CPU work that ``benchmarks/scoring.py`` measures. Random-init weights
   (timm ``pretrained=False``): timing does not depend on the weights.
2. bf16 vs fp32: the largest probability difference between the CUDA engine and a CPU
   fp32 engine on the same patches.
3. One training step (forward, BCE loss, backward, AdamW step; bf16 autocast) and peak memory
   (``torch.cuda.max_memory_allocated``) for LoRA (q/v, rank 8), LoRA on all linear layers,
   and full fine-tuning.
4. The out-of-memory fallback: the process's CUDA memory is capped just above what is
   allocated (``torch.cuda.set_per_process_memory_fraction``), so a big scoring call runs out
   of memory on purpose; the engine must halve its batch until it fits and return the same
   probabilities as an uncapped run.

    python benchmarks/gpu.py [--backbones dinov2_vits14 dinov2_vitb14] [--train-batch 32]

Prints one JSON object on stdout. Without a CUDA device it prints a message and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import median_time  # noqa: E402  (benchmarks/_timing.py)

from MedLoRALib.adapters import AdapterManifest  # noqa: E402
from MedLoRALib.adapters.package import save_adapter  # noqa: E402
from MedLoRALib.engine import ScoringEngine  # noqa: E402
from MedLoRALib.models import LoraSpec, build_model  # noqa: E402
from MedLoRALib.models.classifier import trainable_parameter_count  # noqa: E402
from MedLoRALib.patches import PatchSpec  # noqa: E402
from MedLoRALib.tta import TTA_TRANSFORMS  # noqa: E402

SPEC = PatchSpec()  # the adapters' default: multiview9, 64 px over 50 mm


DEVICE = "cuda"


def _sync() -> None:
    torch.cuda.synchronize()


def _reset_peak() -> None:
    torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)



def _model(backbone: str, mode: str = "lora", lora: LoraSpec | None = None):
    model, _ = build_model(backbone, patch_spec=SPEC, mode=mode, lora=lora or LoraSpec(), pretrained=False,
                           allow_random_init=True)
    return model


def _patches(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(-500, 300, size=(n, *SPEC.shape)).astype(np.float32)


def _adapter(backbone: str, workdir: Path) -> Path:
    model = _model(backbone)
    with torch.no_grad():  # move LoRA B and the head off zero so the adapter changes the output
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return save_adapter(model.eval(), AdapterManifest(name=f"gpu-{backbone}"), workdir / f"gpu-{backbone}")


def _score_rate(engine: ScoringEngine, patches: np.ndarray, batch: int, tta: bool) -> float:
    """Nodules/s: 16 calls of one nodule, or one call of ``batch`` nodules."""
    calls = 16 if batch == 1 else 1
    seconds = median_time(lambda: [engine.score_patches(patches[i * batch:(i + 1) * batch], tta=tta)
                                   for i in range(calls)], 5, warmup=2, sync=_sync)
    return round(calls * batch / seconds, 1)


def scoring(adapter: Path) -> dict:
    out: dict = {}
    patches = _patches(64)
    one_pass = 64 * SPEC.shape[0] * len(TTA_TRANSFORMS)  # 64 nodules x planes x TTA variants
    for label, max_images in (("default_max_batch_images", 288), ("one_pass", one_pass)):
        engine = ScoringEngine(device=DEVICE, max_batch_images=max_images)
        engine.attach_adapter(adapter)
        for tta in (False, True):
            for batch in (1, 64):
                out[f"{label}/tta={'x8' if tta else 'off'}/batch={batch}"] = _score_rate(engine, patches, batch, tta)
    gpu = ScoringEngine(device=DEVICE)
    gpu.attach_adapter(adapter)
    cpu = ScoringEngine(device="cpu")
    cpu.attach_adapter(adapter)
    few = patches[:8]
    bf16 = np.array([r["probability"] for r in gpu.score_patches(few, tta=False)])
    fp32 = np.array([r["probability"] for r in cpu.score_patches(few, tta=False)])
    out["bf16_vs_fp32_cpu_max_abs_probability_diff"] = float(np.abs(bf16 - fp32).max())
    return out


def _train_arm(backbone: str, mode: str, lora: LoraSpec | None, patches: torch.Tensor, labels: torch.Tensor) -> dict:
    torch.cuda.empty_cache()
    model = _model(backbone, mode, lora).to(DEVICE).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logits = model(patches).float()
        loss_fn(logits, labels).backward()
        optimizer.step()

    step()  # optimizer state allocated before the peak is measured
    _sync()
    _reset_peak()
    seconds = median_time(step, 10, warmup=2, sync=_sync)
    trainable, total = trainable_parameter_count(model)
    return {"step_s": round(seconds, 4), "nodules_per_s": round(len(patches) / seconds, 1),
            "peak_memory_mib": _peak_mib(), "trainable_parameters": trainable, "total_parameters": total}


def training_step(backbone: str, batch: int) -> dict:
    patches = torch.from_numpy(_patches(batch, seed=1)).to(DEVICE)
    labels = torch.arange(batch, device=DEVICE).remainder(2).float()
    out = {arm: _train_arm(backbone, mode, lora, patches, labels)
           for arm, mode, lora in (("lora_qv", "lora", LoraSpec(targets="qv")),
                                   ("lora_all", "lora", LoraSpec(targets="all")), ("full", "full", None))}
    out["lora_qv_over_full_step_time"] = round(out["lora_qv"]["step_s"] / out["full"]["step_s"], 3)
    return out


class _Halvings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def oom_fallback(adapter: Path, nodules: int = 512, headroom_mib: int = 256) -> dict:
    """Cap CUDA memory just above what is allocated and score one big call: the engine must halve."""
    patches = _patches(nodules, seed=2)
    reference = ScoringEngine(device="cuda", max_batch_images=10**9)
    reference.attach_adapter(adapter)
    expected = np.array([r["probability"] for r in reference.score_patches(patches[:32], tta=True)])
    del reference
    torch.cuda.empty_cache()
    engine = ScoringEngine(device="cuda", max_batch_images=10**9)  # one forward pass for the whole call
    engine.attach_adapter(adapter)
    total = torch.cuda.get_device_properties(0).total_memory
    cap = torch.cuda.memory_allocated() + headroom_mib * 2**20
    handler = _Halvings()
    logging.getLogger("MedLoRALib.engine").addHandler(handler)
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        start = time.perf_counter()
        results = engine.score_patches(patches, tta=True)
        seconds = time.perf_counter() - start
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        logging.getLogger("MedLoRALib.engine").removeHandler(handler)
    got = np.array([r["probability"] for r in results[:32]])
    return {"nodules": nodules, "tta": "x8", "memory_cap_mib": round(cap / 2**20),
            "halvings": len(handler.messages), "warnings": handler.messages[:12],
            "device_after": str(engine.device), "seconds": round(seconds, 2),
            "max_abs_probability_diff_vs_uncapped": float(np.abs(got - expected).max()),
            "all_scored": len(results) == nodules}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["dinov2_vits14", "dinov2_vitb14"])
    parser.add_argument("--train-batch", type=int, default=32, help="nodules per training step (default 32)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU and torch.cuda.is_available() is False on this machine "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU machine.",
              file=sys.stderr)
        return 2
    report: dict = {"machine": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                "cuda": torch.version.cuda, "python": platform.python_version(),
                                "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)},
                    "patch_spec": {"views": SPEC.views, "pixels": SPEC.pixels, "fov_mm": SPEC.fov_mm},
                    "scoring_nodules_per_s": {}, "training_step": {}}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {b: _adapter(b, Path(tmp)) for b in args.backbones}
        for backbone, adapter in adapters.items():
            report["scoring_nodules_per_s"][backbone] = scoring(adapter)
            print(f"scored with {backbone}", file=sys.stderr, flush=True)
        for backbone in args.backbones:
            report["training_step"][backbone] = training_step(backbone, args.train_batch)
            print(f"trained with {backbone}", file=sys.stderr, flush=True)
        report["oom_fallback"] = oom_fallback(adapters[args.backbones[-1]])
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
