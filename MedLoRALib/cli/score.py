"""``medlora score``: malignancy probabilities for marked nodules, as a CSV or JSON table.

One study: ``--volume`` is a DICOM folder or volume file and ``--points`` any supported
annotation file. Several studies: ``--volume`` is a folder whose subfolders (or volume
files) are one study each, found as ``medlora crop`` finds them, and ``--points`` says
which study each nodule belongs to; a progress bar shows the studies. Patches are cut
with the adapter's own patch spec. A study that cannot be read is reported and skipped.
Every row says whether the adapter's backbone was randomly initialised, and which test-time
augmentation set scored it (``tta``): the adapter's own (its manifest's ``tta``; ``d8`` for
adapters that record none) unless ``--tta SET`` or ``--no-tta`` says otherwise.

``--adapter`` given several times scores with an ensemble (``ensemble.py``): the adapters must
read the same patches of the same backbone (refused before any model loads otherwise); the
patches are cut once and each member runs on the one loaded backbone. Each row then holds the
members' mean ``probability``, their ``spread`` (standard deviation, the uncertainty),
``disagree`` (the members' own labels differ) and each member's probability as ``p_<adapter>``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import AnnotationError, MedLoRAError
from ..tta import TTA_BY_COUNT, TTA_SETS, ensemble_tta, parse_tta_option
from .inputs import add_input_arguments, read_inputs

COLUMNS = ("study", "nodule_id", "case_id", "x_lps", "y_lps", "z_lps", "probability", "logit", "label",
           "threshold", "adapter", "adapter_version", "random_init", "view_probabilities", "note", "tta")
ENSEMBLE_COLUMNS = ("study", "nodule_id", "case_id", "x_lps", "y_lps", "z_lps", "probability", "spread", "disagree",
                    "label", "threshold", "adapter", "adapter_version", "random_init", "note",
                    "tta")  # + p_<adapter> each
RANDOM_INIT_NOTE = "backbone randomly initialised: not a clinical result"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("--adapter", required=True, action="append",
                        help="adapter folder, .zip, or name in the adapter store; repeat it to score with an "
                             "ensemble (mean probability, spread between adapters, disagreement)")
    parser.add_argument("--out", help="results file, .csv or .json (default: CSV on stdout)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (default: auto, or $MEDLORA_DEVICE)")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--tta", metavar="SET", type=str,
                     help=f"test-time augmentation set ({', '.join(TTA_SETS)}) or count ({', '.join(map(str, TTA_BY_COUNT))}) instead of the "
                          "adapter's own (its manifest's tta; d8, all eight flips/quarter turns, if it records none)")
    tta.add_argument("--no-tta", action="store_true", help="no test-time augmentation (flips/rotations)")
    parser.add_argument("--weights", help="backbone weights file (.safetensors), when not found otherwise")
    parser.add_argument("--store", help="adapter store folder (default: the user's data folder)")
    parser.add_argument("--sr", metavar="OUT.dcm",
                        help="also write the scores as a DICOM SR (TID 1500 measurement report); the CT must be a "
                             "DICOM series. With a folder of studies: a folder that gets one STUDY.dcm per study")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out results file or --sr report that medlora score wrote earlier "
                             "(other files are never replaced)")


def member_column(adapter: str) -> str:
    return f"p_{adapter}"


def result_rows(results: list[dict], study: str, threshold: float | None = None) -> list[dict]:
    """One row per nodule: ``COLUMNS`` for one adapter (at ``threshold``); for ``ScoringEngine.score_ensemble``
    results (which carry their own threshold), ``ENSEMBLE_COLUMNS`` + one ``p_<adapter>`` per member."""
    rows = []
    for result in results:
        x, y, z = result["centre_lps"]
        row = {
            "study": study, "nodule_id": result["nodule_id"], "case_id": result["case_id"],
            "x_lps": round(x, 3), "y_lps": round(y, 3), "z_lps": round(z, 3),
            "probability": result["probability"], "label": result["label"],
            "adapter": result["adapter"], "adapter_version": result["adapter_version"],
            "random_init": result["random_init"], "note": RANDOM_INIT_NOTE if result["random_init"] else "",
            "tta": result["tta"],
        }
        if "members" in result:
            row.update(spread=result["spread"], disagree=result["disagree"], threshold=result["threshold"],
                       **{member_column(m["adapter"]): m["probability"] for m in result["members"]})
        else:
            row.update(logit=result["logit"], threshold=threshold, view_probabilities=result["view_probabilities"])
        rows.append(row)
    return rows


def render(rows: list[dict], as_json: bool, adapter: dict, members: list[str] | None = None) -> str:
    """The results as JSON, or as CSV (``COLUMNS``; with ``members``, an ensemble's columns)."""
    if as_json:
        return json.dumps({"adapter": adapter, "results": rows}, indent=2) + "\n"
    columns = COLUMNS if not members else ENSEMBLE_COLUMNS + tuple(member_column(m) for m in members)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {**row, "random_init": str(row["random_init"]).lower()}
        if members:
            cells["disagree"] = str(row["disagree"]).lower()
        else:
            cells["view_probabilities"] = ";".join(f"{p:.6f}" for p in row["view_probabilities"])
        writer.writerow(cells)
    return buffer.getvalue()


def _note_unmatched(points: Path, fmt: str, scored: int, where: str) -> None:
    """Say how many rows of a points CSV belong to none of the CTs scored (never drop them silently)."""
    if fmt != "points":
        return
    from ..annotations._common import read_csv

    total = len(read_csv(points, "points", ("x", "y", "z", "coordinate_system"))[1])
    if scored < total:
        print(f"medlora score: note: {total - scored} of {total} rows of {points} name an image or series_uid "
              f"that is not {where}; they were not scored", file=sys.stderr)


def check_results_output(out: Path, overwrite: bool) -> None:
    """Refuse to replace a file unless asked to, and then only a results file medlora score wrote."""
    if not out.exists():
        return
    if not overwrite:
        raise MedLoRAError(f"--out {out} already exists; pass --overwrite to replace an earlier medlora score "
                           "result, or name a new file")
    try:
        with open(out, encoding="utf-8") as handle:
            head = handle.read(4096)
    except (OSError, UnicodeDecodeError):
        head = ""
    # the header up to ``note``: files written before the ``tta`` column (added last) are ours too
    ours = head.startswith((",".join(COLUMNS[:-1]), ",".join(ENSEMBLE_COLUMNS[:-1]))) or (head.lstrip().startswith("{") and '"results"' in head
                                                   and '"adapter"' in head)
    if not ours:
        raise MedLoRAError(f"--out {out} is not a medlora score results file, so MedLoRA will not replace it even "
                           "with --overwrite; name a new file")


def _score_study(engine, ct, points: Path, fmt: str, study: str, args, tta: bool | str,
                 sr: Path | None = None, members: list[str] | None = None) -> list[dict]:
    from ..annotations import load_nodules, validate_inside

    nodules = load_nodules(points, image=ct, fmt=fmt)
    if nodules:
        validate_inside(nodules, ct, check_body=not args.no_body_check)
    if members:
        results = engine.score_ensemble(ct, nodules, members, tta=tta)
        manifests = [engine.manifest(name) for name in members]
    else:
        results = engine.score(ct, nodules, tta=tta)
        manifests = engine.manifest()
    if sr is not None and results:
        from ..report.sr import write_score_sr

        write_score_sr(sr, ct, nodules, results, manifests, tta=tta, overwrite=args.overwrite)
    return result_rows(results, study, None if members else engine.manifest().threshold)


def read_ensemble(adapters: list[str], store) -> dict[str, Path]:
    """Where each member of ``--adapter A --adapter B ...`` is, by name; a set that cannot be combined is
    refused from the manifests alone, before any model loads."""
    from ..adapters import read_manifest
    from ..adapters.store import resolve_adapter
    from ..ensemble import check_compatible

    locations, manifests = {}, {}
    for given in adapters:
        location = resolve_adapter(given, store)
        manifest = read_manifest(location)
        if manifest.name in manifests:
            raise MedLoRAError(f"--adapter {given}: another --adapter is also named {manifest.name!r}; each member "
                               "of an ensemble needs its own name (medlora adapters import ... --name NEW)")
        locations[manifest.name], manifests[manifest.name] = location, manifest
    check_compatible(manifests)
    return locations


def _adapter_info(engine, members: list[str] | None, tta: bool | str) -> dict:
    """The JSON output's ``adapter``: the one adapter, or the ensemble and its members; ``tta`` is the set
    each scored with (``"none"`` without TTA)."""
    def info(m):
        return {"name": m.name, "version": m.version_id, "backbone": m.backbone, "random_init": m.random_init,
                "threshold": m.threshold, "tta": engine.tta_set(tta, m.name)}

    if not members:
        return info(engine.manifest())
    manifests = [engine.manifest(name) for name in members]
    return {"name": "+".join(members), "ensemble": True, "members": [info(m) for m in manifests],
            "backbone": manifests[0].backbone, "random_init": any(m.random_init for m in manifests),
            "threshold": sum(m.threshold for m in manifests) / len(manifests),
            "tta": ensemble_tta([engine.tta_set(tta, name) for name in members])}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..adapters.store import AdapterStore
    from ..ctio import load_ct
    from ..engine import ScoringEngine

    tta = False if args.no_tta else parse_tta_option(args.tta) if args.tta is not None else True
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise MedLoRAError(f"--out {out}: use a .csv or .json file name")
    if out is not None and out.is_dir():
        raise MedLoRAError(f"--out {out} is a folder; name the results file to write (.csv or .json)")
    if out is not None:
        check_results_output(out, args.overwrite)
    inputs = read_inputs(args)
    volume, points, fmt, studies = inputs.volume, inputs.points, inputs.points_format, inputs.studies

    ct = load_ct(volume, series_uid=args.series_uid) if studies is None else None  # bad input fails before the model loads
    sr = Path(args.sr) if args.sr else None
    if sr is not None:
        from ..report.sr import check_sr_output, require_dicom_origin

        if studies is None:
            require_dicom_origin(ct)
            check_sr_output(sr, args.overwrite)
        elif sr.exists() and not sr.is_dir():
            raise MedLoRAError(f"--sr {sr}: with a folder of studies, --sr names a folder (one STUDY.dcm per study)")
    store = AdapterStore(args.store) if args.store else None
    ensemble = read_ensemble(args.adapter, store) if len(args.adapter) > 1 else None
    engine = ScoringEngine(device=args.device, store=store)
    for given, name in zip(args.adapter, ensemble or [None]):
        manifest = engine.attach_adapter(ensemble[name] if ensemble else given, name=name, weights=args.weights)
        if manifest.random_init:
            print(f"medlora score: warning: adapter {manifest.name!r} was trained on a randomly initialised "
                  "backbone; its scores are not clinical results (every row says so)", file=sys.stderr)
    members = list(ensemble) if ensemble else None
    rows: list[dict] = []
    if studies is None:
        rows = _score_study(engine, ct, points, fmt, volume.name, args, tta, sr, members)
        if not rows:
            raise AnnotationError(f"{points} has nodules, but none for this CT ({volume.name}): check that the "
                                  "file names this series or image")
        failed = []
        _note_unmatched(points, fmt, len(rows), f"this CT ({volume.name})")
    else:
        failed = []
        for study in tqdm(studies, desc="studies", unit="study", disable=None, file=sys.stderr):
            try:
                ct = load_ct(study.path, series_uid=args.series_uid)
                rows += _score_study(engine, ct, points, fmt, study.name, args, tta,
                                     sr / f"{study.name}.dcm" if sr is not None else None, members)
            except MedLoRAError as exc:
                failed.append(f"{study.name}: {exc}")
        if failed:
            print(f"medlora score: {len(failed)} of {len(studies)} studies not scored:\n  " + "\n  ".join(failed),
                  file=sys.stderr)
        else:
            _note_unmatched(points, fmt, len(rows), f"one of the {len(studies)} studies in {volume}")
        if not rows:
            raise AnnotationError(f"no nodule in {points} could be scored in the {len(studies)} studies in "
                                  f"{volume} ({len(failed)} failed); check the series UIDs / image names")
    adapter_info = _adapter_info(engine, members, tta)
    text = render(rows, as_json=out is not None and out.suffix.lower() == ".json", adapter=adapter_info,
                  members=members)
    if members:
        disagree = sum(row["disagree"] for row in rows)
        print(f"medlora score: ensemble of {len(members)} adapters ({', '.join(members)}): they disagree across "
              f"their thresholds on {disagree} of {len(rows)} nodule(s); largest spread "
              f"{max(row['spread'] for row in rows):.3f}", file=sys.stderr)
    if out is None:
        sys.stdout.write(text)
    else:
        write_text_atomic(out, text)
        print(f"scored {len(rows)} nodule(s) with adapter {adapter_info['name']!r}; results in {out}",
              file=sys.stderr)
    if sr is not None:
        print(f"DICOM SR (TID 1500) written to {sr}", file=sys.stderr)
    return 2 if failed else 0
