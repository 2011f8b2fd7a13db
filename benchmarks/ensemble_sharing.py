"""What an ensemble request shares: time of ``score_patches_ensemble`` against its members scored one by one.

Three random-init adapters on one DINOv2 ViT-S/14 at 112 px (ortho3), first with LoRA on every block
(nothing but the patch embedding precedes the first LoRA block, so nothing is shared), then with LoRA
on the last 4 of the 12 blocks (the first 8 run once for all members). Prints the median seconds of
each in wall and CPU time (the two alternate, A B then B A) and the speed-up; every member's probabilities are checked equal
in both ways. With LoRA on every block the two do the same work: that row shows the timing noise.

    PYTHONPATH=. python benchmarks/ensemble_sharing.py [--nodules 8] [--repeats 4] [--tta]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _timing import median_time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedLoRALib.adapters import AdapterManifest  # noqa: E402
from MedLoRALib.adapters.package import save_adapter  # noqa: E402
from MedLoRALib.engine import ScoringEngine  # noqa: E402
from MedLoRALib.models import LoraSpec, build_model  # noqa: E402
from MedLoRALib.patches import PatchSpec  # noqa: E402

BACKBONE = "dinov2_vits14"
SPEC = PatchSpec(views="ortho3", fov_mm=50.0, pixels=112)
MEMBERS = 3


def _adapter(name: str, lora: LoraSpec, seed: int, folder: Path) -> Path:
    model, _ = build_model(BACKBONE, patch_spec=SPEC, lora=lora, pretrained=False, allow_random_init=True)
    with torch.no_grad():  # move LoRA B and the head off their initial values, as training would
        generator = torch.Generator().manual_seed(seed)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return save_adapter(model.eval(), AdapterManifest(name=name), folder / name)


def measure(lora: LoraSpec, patches: np.ndarray, tta: bool, repeats: int, folder: Path) -> dict:
    engine = ScoringEngine(device="cpu")
    names = [f"m{i}" for i in range(MEMBERS)]
    for seed, name in enumerate(names):
        engine.attach_adapter(_adapter(name, lora, seed, folder))
    together = engine.score_patches_ensemble(patches, names, tta=tta)
    alone = [engine.score_patches(patches, name, tta=tta) for name in names]
    for index, name in enumerate(names):
        got = [r["members"][index]["probability"] for r in together]
        assert np.allclose(got, [r["probability"] for r in alone[index]], rtol=0, atol=1e-6), name
    runs = {"ensemble_s": lambda: engine.score_patches_ensemble(patches, names, tta=tta),
            "one_by_one_s": lambda: [engine.score_patches(patches, name, tta=tta) for name in names]}
    times: dict[str, list[float]] = {key: [] for key in runs}
    cpu: dict[str, list[float]] = {key: [] for key in runs}
    for repeat in range(repeats):  # A B, B A, ...: load drift and whatever runs first weigh on both alike
        for key in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
            start = time.process_time()  # CPU seconds of this process: what other processes' load hides in wall time
            times[key].append(median_time(runs[key], 1, warmup=0))
            cpu[key].append(time.process_time() - start)
    return {"shared_blocks": engine.shared_prefix_blocks(names), "backbone_loads": engine.backbone_loads,
            **{key: statistics.median(values) for key, values in times.items()},
            **{f"{key}_cpu": statistics.median(values) for key, values in cpu.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodules", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--tta", action="store_true")
    args = parser.parse_args()
    patches = np.random.default_rng(0).normal(0, 1, size=(args.nodules, *SPEC.shape)).astype(np.float32)
    print(f"{MEMBERS} adapters on {BACKBONE} at {SPEC.pixels} px ({SPEC.views}), {args.nodules} nodules, "
          f"tta={args.tta}, {torch.get_num_threads()} threads")
    print("| LoRA blocks | blocks run once | ensemble: wall / CPU (s) | members one by one: wall / CPU (s) | "
          "speed-up: wall / CPU |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, lora in (("all 12", LoraSpec()), ("last 4", LoraSpec(last_n_blocks=4))):
            row = measure(lora, patches, args.tta, args.repeats, Path(tmp))
            print(f"| {label} | {row['shared_blocks']} | {row['ensemble_s']:.2f} / {row['ensemble_s_cpu']:.2f} | "
                  f"{row['one_by_one_s']:.2f} / {row['one_by_one_s_cpu']:.2f} | "
                  f"{row['one_by_one_s'] / row['ensemble_s']:.2f}× / "
                  f"{row['one_by_one_s_cpu'] / row['ensemble_s_cpu']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
