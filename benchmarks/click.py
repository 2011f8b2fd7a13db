"""A click as the Slicer module answers it, and batch scoring, for ViT-S/14 on the CPU: before and after.

What the issue's goal counts: one nodule point in an MRML scene (slicer-core) → patches cut in
the calling (Slicer's) process → sent to a warm ``medlora serve`` → scored with test-time
augmentation → results table updated (``ScoringSession.score``). And batch scoring: 64 points
in one request without TTA, nodules/s.

Every variant is a (precision, TTA set, pixels) triple. One engine per precision (the engine
process reads ``MEDLORA_PRECISION``, as Slicer's engine would), one ViT-S/14 LoRA q/v adapter
(random init: timing only) per pixel count, all attached before timing; the variants then run
in interleaved rounds so load changes hit all alike, and ratios are against the first variant
(the old path: fp32, all eight TTA variants, 64 px). Prints one JSON object.

    HF_HUB_OFFLINE=1 python benchmarks/click.py [--rounds 5] [--threads 2]
        [--variants fp32:d8:64 int8:d8:64 fp32:rot4:64 int8:rot4:64 fp32:rot4:56 int8:rot4:56]
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
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))

from _report import emit  # noqa: E402  (benchmarks/_report.py)

DEFAULT_VARIANTS = ["fp32:d8:64", "int8:d8:64", "fp32:rot4:64", "int8:rot4:64", "fp32:rot4:56", "int8:rot4:56"]


def _parse(variant: str) -> tuple[str, str, int]:
    """``precision:tta-set:pixels``, the set checked here rather than once the engines have started."""
    from MedLoRALib.tta import check_tta_name

    precision, tta, pixels = variant.split(":")
    return precision, check_tta_name(tta, f"--variants {variant}: set"), int(pixels)


def _adapter(folder: Path, pixels: int) -> Path:
    from helpers import save_tiny_adapter  # Testing/helpers.py

    from MedLoRALib.models import LoraSpec
    from MedLoRALib.patches import PatchSpec

    spec = PatchSpec(views="multiview9", fov_mm=50.0, pixels=pixels)
    return save_tiny_adapter(folder, f"vits14-{pixels}px", spec, backbone="dinov2_vits14",
                             lora=LoraSpec(rank=8, targets="qv"), scale=0.02)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="precision:tta-set:pixels")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="points scored in one batch request, no TTA")
    parser.add_argument("--threads", type=int, default=2, help="the engines' torch threads")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    variants = [_parse(v) for v in args.variants]

    from MedLoRALib.slicer import mrml
    from MedLoRALib.slicer.engine_client import EngineConfig
    from MedLoRALib.slicer.scoring import ScoringSession
    from MedLoRALib.synthetic import PhantomConfig, make_phantom

    headless = mrml.create_headless_scene()
    image, nodules = make_phantom(PhantomConfig(n_nodules=4), seed=0, case_id="click")
    volume = mrml.add_volume_node(headless.scene, image, name="click")
    one = mrml.add_markups_node(headless.scene, nodules[:1], name="one click")
    many = mrml.add_markups_node(headless.scene, [nodules[i % len(nodules)] for i in range(args.batch)],
                                 name="batch")
    load_before = [round(v, 2) for v in os.getloadavg()]
    sessions: dict[str, ScoringSession] = {}
    with tempfile.TemporaryDirectory() as folder:
        try:
            for precision in dict.fromkeys(p for p, _, _ in variants):
                env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "MEDLORA_PRECISION": precision}
                config = EngineConfig(python=sys.executable, extra_args=["--device", "cpu"], env=env)
                sessions[precision] = session = ScoringSession(headless.scene, engine_config=config)
                for pixels in dict.fromkeys(px for _, _, px in variants):
                    session.attach_adapter(str(_adapter(Path(folder), pixels)), name=f"{pixels}px")
            tables: dict = {}

            def click(precision: str, tta: str, pixels: int, markups=one, key="click") -> float:
                session = sessions[precision]
                start = time.perf_counter()
                table, rows = session.score(volume, markups, adapter=f"{pixels}px", tta=tta,
                                            table_node=tables.get((key, precision, pixels)))
                elapsed = time.perf_counter() - start
                tables[(key, precision, pixels)] = table
                assert len(rows) == markups.GetNumberOfControlPoints(), "a point went unscored"
                return elapsed

            for p, t, px in variants:  # warm-up: the int8 copy is made on first use
                click(p, t, px)
                click(p, False, px, many, "batch")
            clicks: dict = {v: [] for v in variants}
            batches: dict = {(p, px): [] for p, _, px in variants}
            for _ in range(args.rounds):
                for v in variants:
                    clicks[v].append(click(*v))
                for p, px in batches:
                    batches[p, px].append(click(p, False, px, many, "batch"))
        finally:
            for session in sessions.values():
                session.close()

    click_s = {v: statistics.median(t) for v, t in clicks.items()}
    batch_s = {k: statistics.median(t) for k, t in batches.items()}
    first = variants[0]
    results = {}
    for v in variants:
        p, t, px = v
        results[":".join(map(str, v))] = {
            "click_s": round(click_s[v], 3), "click_speedup": round(click_s[first] / click_s[v], 2),
            "batch_no_tta_nodules_per_s": round(args.batch / batch_s[p, px], 1),
            "batch_speedup": round(batch_s[first[0], first[2]] / batch_s[p, px], 2),
        }
    return emit({
        "what": "click: 1 point, cut in the caller, warm medlora serve, TTA, table updated; batch: "
                f"{args.batch} points, no TTA; ViT-S/14 LoRA q/v r8 (random init), multiview9 50 mm",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()]},
        "engine_threads": args.threads, "rounds": args.rounds, "speedups_against": ":".join(map(str, first)),
        "variants": results,
    }, args.out)


if __name__ == "__main__":
    sys.exit(main())
