"""Scoring from the Slicer logic: a warm engine that switches adapters vs a fresh process per scoring.

On one synthetic study with N nodule points in an MRML scene (slicer-core), times

* ``cut_patches``: patches cut in the calling process (Slicer's), torch-free;
* ``set_adapter``: one round trip switching the warm engine's active adapter;
* ``warm_score``: ``ScoringSession.score`` with the active adapter (cut, send, score, table, colours);
* ``warm_switch_and_score``: switch to the other adapter, then score — what the user waits for
  after choosing another adapter in the module;
* ``cold_score``: start a new ``medlora serve``, attach the adapter, score, shut down — what
  the anchors do for every inference (a new process that reloads the model).

Adapters: two LoRA adapters of the tiny backbone (random init, multiview9 at 64 px, the
demo's patches), test-time augmentation on (8 variants). Wall-clock medians; the engine runs
in its own process, so ``--threads`` sets its torch threads through ``OMP_NUM_THREADS``.
Prints one JSON object.

    HF_HUB_OFFLINE=1 python benchmarks/slicer_engine.py [--nodules 4] [--repeats 7] [--cold-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _timing import median_time  # benchmarks/_timing.py


def _adapters(folder: Path, spec) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))
    from helpers import save_tiny_adapter

    return {name: save_tiny_adapter(folder, name, spec, seed=seed)[0] for seed, name in enumerate(("site-a", "site-b"))}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodules", type=int, default=4, help="points in the study")
    parser.add_argument("--repeats", type=int, default=7, help="warm measurements; the median is kept")
    parser.add_argument("--cold-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="the engine's torch threads")
    args = parser.parse_args(argv)

    from MedLoRALib.patches import PatchSpec
    from MedLoRALib.slicer import mrml
    from MedLoRALib.slicer.engine_client import EngineConfig
    from MedLoRALib.slicer.scoring import ScoringSession, cut_patches
    from MedLoRALib.synthetic import PhantomConfig, make_phantom

    spec = PatchSpec(views="multiview9", fov_mm=50.0, pixels=64)
    config = EngineConfig(python=sys.executable, extra_args=["--device", "cpu"],
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)})
    headless = mrml.create_headless_scene()
    image, nodules = make_phantom(PhantomConfig(n_nodules=args.nodules), seed=0, case_id="bench")
    volume = mrml.add_volume_node(headless.scene, image, name="bench")
    markups = mrml.add_markups_node(headless.scene, nodules, name="bench nodules")

    with tempfile.TemporaryDirectory() as folder:
        paths = _adapters(Path(folder), spec)
        results: dict[str, float] = {"cut_patches_s": median_time(lambda: cut_patches(volume, markups, spec), args.repeats, warmup=0)}

        warm = ScoringSession(headless.scene, engine_config=config)
        try:
            start = time.perf_counter()
            warm.engine.start()
            results["engine_start_s"] = time.perf_counter() - start
            start = time.perf_counter()
            for name, path in paths.items():
                warm.attach_adapter(str(path), name=name)
            results["attach_two_adapters_s"] = time.perf_counter() - start
            table = warm.score(volume, markups, adapter="site-a")[0]  # warm-up
            other = iter(["site-b", "site-a"] * args.repeats)
            results["set_adapter_s"] = median_time(lambda: warm.set_adapter(next(other)), args.repeats, warmup=0)
            warm.set_adapter("site-a")
            results["warm_score_s"] = median_time(lambda: warm.score(volume, markups, table_node=table), args.repeats, warmup=0)
            other = iter(["site-b", "site-a"] * args.repeats)

            def switch_and_score():
                warm.set_adapter(next(other))
                warm.score(volume, markups, table_node=table)

            results["warm_switch_and_score_s"] = median_time(switch_and_score, args.repeats, warmup=0)
            starts = warm.engine.starts
        finally:
            warm.close()

        def cold():
            logic = ScoringSession(headless.scene, engine_config=config)
            try:
                logic.attach_adapter(str(paths["site-b"]), name="site-b")
                logic.score(volume, markups, table_node=table)
            finally:
                logic.close()

        results["cold_score_s"] = median_time(cold, args.cold_repeats, warmup=0)

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "setup": {"nodules": args.nodules, "views": spec.views, "pixels": spec.pixels, "tta": True,
                  "backbone": "medlora_tiny (random init)", "engine_threads": args.threads,
                  "repeats": args.repeats, "cold_repeats": args.cold_repeats, "warm_engine_starts": starts},
        "seconds": {k: round(v, 4) for k, v in results.items()},
        "ratios": {
            "cold_over_warm_switch_and_score": round(results["cold_score_s"] / results["warm_switch_and_score_s"], 1),
            "switch_share_of_switch_and_score": round(results["set_adapter_s"] / results["warm_switch_and_score_s"], 3),
            "cut_share_of_warm_score": round(results["cut_patches_s"] / results["warm_score_s"], 3),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
