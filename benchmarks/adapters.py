"""Adapter switching vs reloading the backbone, and adapter size on disk.

One run, one machine: two LoRA adapters (r=8, q and v) for the same ViT-S/14 backbone
(random weights saved to a local .safetensors file, so that loading goes through the
same file reading and SHA-256 check as pretrained weights). Times

* switch: ``engine.set_adapter`` + activation of the other adapter's LoRA on the shared
  backbone (what happens before the first forward pass with the new adapter);
* reload: a fresh engine that loads the backbone from its file and attaches the other
  adapter (what a single-adapter process would have to do);

and reports the size of an adapter for ViT-S/14 r=8 qv and ViT-B/14 r=4 qv (MeLo's
setting: about 0.5 MB for ViT-B r=4), and what verifying one costs (SHA-256 of every
file and the safetensors structure check, done at every attach, import and export).

    python benchmarks/adapters.py [--threads 2] [--switches 200]

Prints one JSON object.
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

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))

from helpers import save_tiny_adapter  # noqa: E402  (Testing/helpers.py)

from MedLoRALib.adapters.archive import read_checked  # noqa: E402
from MedLoRALib.adapters.package import LORA_WEIGHTS  # noqa: E402
from MedLoRALib.adapters.store import AdapterStore  # noqa: E402
from MedLoRALib.engine import ScoringEngine  # noqa: E402
from MedLoRALib.models import LoraSpec, create_backbone, trainable_parameter_count  # noqa: E402
from MedLoRALib.patches import PatchSpec  # noqa: E402

SPEC = PatchSpec(views="multiview9", pixels=64)


def _weights_file(backbone: str, folder: Path) -> Path:
    vit, _ = create_backbone(backbone, allow_random_init=True)
    path = folder / f"{backbone}.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def _adapter(backbone: str, weights: Path, rank: int, seed: int, folder: Path) -> tuple[Path, int]:
    path, model = save_tiny_adapter(folder, f"{backbone}-r{rank}-{seed}", SPEC, backbone=backbone, weights=weights,
                                    lora=LoraSpec(rank=rank, targets="qv"), seed=seed, scale=0.02)
    return path, trainable_parameter_count(model)[0]


def _size(path: Path) -> dict:
    files = {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    return {"total_bytes": sum(files.values()), "lora_weights_bytes": files[LORA_WEIGHTS],
            "total_mb": round(sum(files.values()) / 1e6, 3)}


def switch_vs_reload(backbone: str, folder: Path, switches: int, reloads: int) -> dict:
    weights = _weights_file(backbone, folder)
    (a, _), (b, _) = (_adapter(backbone, weights, 8, seed, folder) for seed in (1, 2))
    store = AdapterStore(folder / "store")
    engine = ScoringEngine(device="cpu", store=store)
    engine.attach_adapter(a, name="a", weights=weights)
    engine.attach_adapter(b, name="b", weights=weights)
    assert engine.backbone_loads == 1

    def switch(name: str) -> float:
        start = time.perf_counter()
        engine.set_adapter(name)
        engine._activate(engine._adapters[name])  # the peft set_adapter the next score would do
        return time.perf_counter() - start

    switch_times = [switch("a" if i % 2 else "b") for i in range(switches)]

    def reload() -> float:
        start = time.perf_counter()
        fresh = ScoringEngine(device="cpu", store=store)
        fresh.attach_adapter(b, name="b", weights=weights)
        return time.perf_counter() - start

    reload_times = [reload() for _ in range(reloads)]
    switch_s, reload_s = statistics.median(switch_times), statistics.median(reload_times)
    return {
        "switch_ms_median": round(switch_s * 1e3, 4),
        "switch_ms_p95": round(sorted(switch_times)[int(0.95 * len(switch_times))] * 1e3, 4),
        "reload_backbone_and_adapter_ms_median": round(reload_s * 1e3, 1),
        "reload_over_switch": round(reload_s / switch_s, 1),
        "switches": switches, "reloads": reloads,
        "targets_met": switch_s < 0.010 and reload_s / switch_s >= 50,
    }


def verify_cost(path: Path, folder: Path, repeats: int = 20) -> dict:
    """Median time to verify an adapter (``read_checked``) and to import it into a store."""
    def timed(action) -> float:
        start = time.perf_counter()
        action()
        return time.perf_counter() - start

    store = AdapterStore(folder / "verify-store")
    verify = [timed(lambda: read_checked(path)) for _ in range(repeats)]
    imports = [timed(lambda: store.import_(path, name="verified", overwrite=True)) for _ in range(repeats)]
    return {"verify_ms_median": round(statistics.median(verify) * 1e3, 3),
            "store_import_ms_median": round(statistics.median(imports) * 1e3, 3), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--switches", type=int, default=200)
    parser.add_argument("--reloads", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, CPU", "torch": torch.__version__,
              "threads": args.threads, "patch_spec": SPEC.to_dict()}
    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir)
        result["switch_vs_reload_dinov2_vits14"] = switch_vs_reload("dinov2_vits14", folder, args.switches,
                                                                    args.reloads)
        sizes = {}
        for backbone, rank in (("dinov2_vits14", 8), ("dinov2_vitb14", 4)):
            weights = _weights_file(backbone, folder)
            path, trainable = _adapter(backbone, weights, rank, 3, folder)
            sizes[f"{backbone}_r{rank}_qv"] = {**_size(path), "trainable_parameters": trainable,
                                               **verify_cost(path, folder)}
            weights.unlink()
        result["adapter_size"] = sizes
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
