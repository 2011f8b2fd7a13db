"""``medlora adapters``: list, inspect, import, export, rename, delete or merge adapters.

Torch-free: the store and manifests are plain files and JSON (``merge`` imports torch when it runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..adapters.archive import read_manifest
from ..adapters.manifest import AdapterManifest
from ..adapters.store import AdapterStore

STORE_HELP = "adapter store folder (default: $MEDLORA_HOME/adapters or the user's data folder)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help=STORE_HELP)
    # --store also after the action (`adapters list --store X`), as score and serve take it after the command;
    # SUPPRESS keeps an absent one from hiding the one given before the action.
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", default=argparse.SUPPRESS, help=STORE_HELP)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[store], help="stored adapters, one per line")
    listing.add_argument("--json", action="store_true", help="full manifests as JSON")
    info = actions.add_parser("info", parents=[store], help="one adapter's manifest")
    info.add_argument("adapter", help="name in the store, or an adapter folder / .zip")
    info.add_argument("--json", action="store_true", help="the manifest as JSON")
    importing = actions.add_parser("import", parents=[store],
                                   help="copy an adapter folder or .zip into the store (always verified)")
    importing.add_argument("path")
    importing.add_argument("--name", help="store it under this name (default: its manifest name)")
    importing.add_argument("--overwrite", "--force", dest="force", action="store_true",
                           help="replace a stored adapter of the same name (the files are still verified)")
    export = actions.add_parser("export", parents=[store], help="write a verified copy as a .zip or a folder")
    export.add_argument("name")
    export.add_argument("dest", help="a .zip file name, or a folder")
    export.add_argument("--overwrite", "--force", dest="force", action="store_true",
                        help="replace an adapter already at DEST, and only its own files: never what is not an "
                        "adapter, nor the training reports or other files kept beside it")
    delete = actions.add_parser("delete", parents=[store], help="remove an adapter from the store")
    delete.add_argument("name")
    rename = actions.add_parser("rename", parents=[store], help="rename a stored adapter")
    rename.add_argument("old")
    rename.add_argument("new")
    merge = actions.add_parser("merge", parents=[store],
                               help="merge LoRA adapters (e.g. from several sites) into one new adapter folder")
    merge.add_argument("adapters", nargs="+", metavar="ADAPTER",
                       help="two or more adapters: names in the store, or adapter folders / .zip files")
    merge.add_argument("--method", choices=("avg", "ties"), default="avg",
                       help="avg: mean of the layers' LoRA updates (default); ties: TIES sign-consensus merging")
    merge.add_argument("--density", type=float, default=0.5,
                       help="ties: fraction of each adapter's update entries kept (default 0.5)")
    merge.add_argument("--rank", type=int, help="LoRA rank of the merged adapter (default: the largest parent rank)")
    merge.add_argument("--out", required=True, type=Path, help="new adapter folder to write")
    merge.add_argument("--name", help="adapter name (default: the --out folder's name)")
    merge.add_argument("--overwrite", action="store_true", help="replace an adapter folder MedLoRA wrote at --out")


def _summary(manifest: AdapterManifest) -> str:
    spec = manifest.patch_spec
    backbone = manifest.backbone + (" (RANDOM INIT)" if manifest.random_init else "")
    lora = f" r={manifest.lora['rank']} {manifest.lora['targets']}" if manifest.lora else ""
    auc = manifest.metrics.get("auc") if isinstance(manifest.metrics, dict) else None
    metric = f"  AUC {auc:.3f}" if isinstance(auc, (int, float)) else ""
    return (f"{manifest.name}  {backbone}  {manifest.mode}{lora}  {spec.get('views')} {spec.get('pixels')} px "
            f"{spec.get('fov_mm')} mm  {manifest.created}{metric}")


def _details(manifest: AdapterManifest) -> str:
    lines = [f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}"
             for key, value in manifest.to_dict().items() if key != "files"]
    lines.append(f"version: {manifest.version_id}")
    lines += [f"file: {name} sha256={digest}" for name, digest in manifest.files.items()]
    return "\n".join(lines)


def _source(store: AdapterStore, given: str) -> Path:
    """An adapter folder / .zip given on the command line, else the store's adapter of that name."""
    path = Path(given).expanduser()
    return path if path.exists() else store.path(given)


def run(args: argparse.Namespace) -> int:
    store = AdapterStore(args.store)
    if args.action == "list":
        manifests = store.list()
        if args.json:
            print(json.dumps([m.to_dict() for m in manifests], indent=2))
        elif not manifests:
            print(f"no adapters in {store.root}")
        for manifest in [] if args.json else manifests:
            print(_summary(manifest))
    elif args.action == "info":
        given = Path(args.adapter).expanduser()
        manifest = read_manifest(given) if given.exists() else store.info(args.adapter)
        print(json.dumps(manifest.to_dict(), indent=2) if args.json else _details(manifest))
    elif args.action == "import":
        name = store.import_(args.path, name=args.name, overwrite=args.force)
        print(f"imported {name!r} into {store.root}")
    elif args.action == "export":
        print(f"exported {args.name!r} to {store.export(args.name, args.dest, overwrite=args.force)}")
    elif args.action == "merge":
        from ..adapters.merge import merge_adapters

        sources = [_source(store, given) for given in args.adapters]
        out = merge_adapters(sources, args.out, method=args.method, density=args.density, rank=args.rank,
                             name=args.name, overwrite=args.overwrite)
        merged = read_manifest(out)
        error = merged.merge["relative_truncation_error"]
        print(f"merged {len(sources)} adapters ({args.method}, rank {merged.merge['rank']}) into {out} as "
              f"{merged.name!r}; relative truncation error {error['overall']:.3g} (largest layer "
              f"{error['max_layer']:.3g}). Not validated: evaluate it on local data before use.")
    elif args.action == "delete":
        store.delete(args.name)
        print(f"deleted {args.name!r} from {store.root}")
    else:
        store.rename(args.old, args.new)
        print(f"renamed {args.old!r} to {args.new!r}")
    return 0
