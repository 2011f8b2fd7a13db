"""``medlora explain``: where the model looked, per nodule, as a volume on the CT's own grid.

For each nodule of one study the adapter's patches are cut (its manifest's view set,
field of view and size), a saliency map is computed on every plane the model reads —
attention rollout through the LoRA-adapted blocks and/or gradient × input — and mapped
back into the CT's grid with one interpolation (``MedLoRALib.explain.volume``). Each map
is a NRRD in LPS with the CT's spacing and direction: by default the block of CT voxels
around the nodule, with ``--full-grid`` the CT's whole grid (same origin, spacing,
direction and size as the input). ``explanations.json`` lists the files, the nodule
centres and each map's peak in LPS and RAS. Slicer loads the NRRDs aligned to the CT.
The maps explain the forward pass without test-time augmentation; its probability is listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..crops import safe_name
from ..errors import AnnotationError, MedLoRAError
from ..outputs import FolderOutput

METHOD_CHOICES = ("rollout", "gradxinput", "both")
INDEX_NAME = "explanations.json"


def _listed_maps(folder: Path) -> set[str] | None:
    """The map files an ``explanations.json`` in ``folder`` lists (None when there is none)."""
    try:
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
        return {entry["file"] for nodule in index["nodules"] for entry in nodule["maps"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


EXPLAIN_OUTPUT = FolderOutput(command="explain", index_name=INDEX_NAME, listed=_listed_maps, contents="maps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--volume", required=True, help="CT: DICOM folder or volume file (one study)")
    parser.add_argument("--points", required=True,
                        help="nodule annotations: points CSV, .mrk.json, LIDC XML, LUNA16 or NLSTx CSV")
    parser.add_argument("--adapter", required=True, help="adapter folder, .zip, or name in the adapter store")
    parser.add_argument("--out", required=True, help="output folder for the NRRD maps and explanations.json")
    parser.add_argument("--method", choices=METHOD_CHOICES, default="both",
                        help="attention rollout, gradient × input, or both (default). Rollout mostly shows the "
                        "frozen backbone's attention (randomising the adapter leaves it rank-correlated at about "
                        "0.85 on the shipped tiny backbone); gradient × input follows the adapter (about 0)")
    parser.add_argument("--full-grid", action="store_true",
                        help="write each map on the CT's whole grid instead of the block around the nodule")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the --out folder of an earlier medlora explain run (as a whole; a folder holding other "
                             "files is never touched)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (default: auto, or $MEDLORA_DEVICE)")
    parser.add_argument("--weights", help="backbone weights file (.safetensors), when not found otherwise")
    parser.add_argument("--store", help="adapter store folder (default: the user's data folder)")
    parser.add_argument("--points-format", choices=("lidc", "luna16", "nlstx", "markups", "points"),
                        help="annotation format, when detecting it from the content is not wanted")
    parser.add_argument("--series-uid", help="DICOM series to read when a folder holds several")
    parser.add_argument("--no-body-check", action="store_true",
                        help="do not refuse points that lie in the air outside the patient")


def _file_stem(index: int, nodule_id: str) -> str:
    return f"{index:04d}_{safe_name(nodule_id)[:60]}"


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..adapters.store import AdapterStore
    from ..annotations import detect_format, load_nodules, validate_inside
    from ..atomic import write_json_atomic
    from ..ctio import load_ct
    from ..engine import ScoringEngine
    from ..explain.volume import saliency_volume, save_saliency
    from ..geometry import lps_to_ras
    from ..nodule import centres_lps
    from ..patches import extract_patches

    volume, points, out = Path(args.volume), Path(args.points), Path(args.out)
    if not volume.exists():
        raise MedLoRAError(f"--volume {volume} does not exist")
    if volume.is_dir() and not any(volume.rglob("*.dcm")) and any(p.is_dir() for p in volume.iterdir()):
        raise MedLoRAError(f"--volume {volume}: medlora explain takes one study (a DICOM folder or volume file)")
    EXPLAIN_OUTPUT.check(out, args.overwrite)  # before any work: never into a folder of someone else's files
    methods = ("rollout", "gradxinput") if args.method == "both" else (args.method,)

    ct = load_ct(volume, series_uid=args.series_uid)  # bad input fails before the model loads
    nodules = load_nodules(points, image=ct, fmt=args.points_format or detect_format(points))
    if not nodules:
        raise AnnotationError(f"{points} has nodules, but none for this CT ({volume.name}): check that the "
                              "file names this series or image")
    validate_inside(nodules, ct, check_body=not args.no_body_check)

    engine = ScoringEngine(device=args.device, store=AdapterStore(args.store) if args.store else None)
    manifest = engine.attach_adapter(args.adapter, weights=args.weights)
    if manifest.random_init:
        print(f"medlora explain: warning: adapter {manifest.name!r} was trained on a randomly initialised "
              "backbone; its maps explain a model that means nothing clinically", file=sys.stderr)
    spec = manifest.spec
    patches = extract_patches(ct, centres_lps(nodules), spec)
    scores = engine.score_patches(patches, tta=False)  # the forward pass the maps explain
    entries = [{"nodule_id": n.nodule_id, "case_id": n.case_id, "centre_lps": [float(v) for v in n.centre_lps],
                "centre_ras": [float(v) for v in lps_to_ras(n.centre_lps)], "probability": s["probability"],
                "label": s["label"], "maps": {}} for n, s in zip(nodules, scores)]
    with EXPLAIN_OUTPUT.writing(out, args.overwrite) as staging:
        for method in methods:
            maps, cell_px = engine.explain_patches(patches, method=method)
            for number, (nodule, nodule_maps, entry) in enumerate(zip(nodules, maps, entries), start=1):
                info = {"adapter": manifest.name, "adapter_version": manifest.version_id, "nodule_id": nodule.nodule_id,
                        "views": spec.views, "random_init": str(bool(manifest.random_init)).lower()}
                result = saliency_volume(nodule_maps, ct, nodule.centre_lps, spec, cell_px, method,
                                         full_grid=args.full_grid, info=info)
                path = save_saliency(result, staging / f"{_file_stem(number, nodule.nodule_id)}_{method}.nrrd")
                peak = result.peak_lps()
                entry["maps"][method] = {"file": path.name, "peak_lps": [float(v) for v in peak],
                                         "peak_ras": [float(v) for v in lps_to_ras(peak)],
                                         "max": float(np.max(result.values)), "min": float(np.min(result.values))}
        write_json_atomic(staging / INDEX_NAME, {
            "adapter": {"name": manifest.name, "version": manifest.version_id, "backbone": manifest.backbone,
                        "random_init": manifest.random_init, "views": spec.views},
            "grid": "ct" if args.full_grid else "nodule block of the CT grid",
            "coordinates": "NRRD space left-posterior-superior (LPS); peaks also in RAS as Slicer shows them",
            "nodules": entries}, indent=2)
    print(f"explained {len(nodules)} nodule(s) with {', '.join(methods)}; maps and {INDEX_NAME} in {out}",
          file=sys.stderr)
    return 0
