"""``medlora web``: score and inspect nodules in the browser (trame-slicer; needs ``pip install medlora[web]``).

Binds 127.0.0.1 unless ``--host`` names another address; then a token is printed with the
address and every request must carry it. Only files under ``--data-root`` can be opened.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..errors import MedLoRAError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", required=True, help="folder whose CTs and point files the page may open")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; any other needs the printed token)")
    parser.add_argument("--store", help="adapter store folder (default: the user's data folder)")
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH",
                        help="an adapter folder or .zip to offer beside the store's (repeatable)")
    parser.add_argument("--work-dir", help="where training sets and runs go (default: MedLoRA's data folder)")
    parser.add_argument("--device", default="auto", help="engine device: cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--engine-python", help="Python with torch for the scoring engine and training (default: this "
                        "one); the web app itself needs no torch")
    parser.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload accepted (MiB)")


def run(args: argparse.Namespace) -> int:
    try:
        from trame.app import get_server
    except ImportError as exc:
        raise MedLoRAError("medlora web needs the web extra: pip install 'medlora[web]' "
                           f"(missing: {exc.name}).") from None
    from ..web import access
    from ..web.app import MedLoRAWeb, WebConfig
    from ..web.paths import DataRoot

    if not 0 <= args.port <= 65535:
        raise MedLoRAError(f"--port {args.port}: give a port between 0 and 65535.")
    root = DataRoot.at(args.data_root, max_upload_bytes=int(args.max_upload_mb * 2**20))
    config = WebConfig(data_root=root, store=Path(args.store).expanduser() if args.store else None,
                       work_dir=Path(args.work_dir).expanduser() if args.work_dir else None, device=args.device,
                       engine_python=args.engine_python, adapters=tuple(Path(p).expanduser() for p in args.adapter))
    for name in ("trame_server", "trame_client", "trame_slicer", "trame_rca", "wslink", "aiohttp"):  # INFO says nothing to users
        logging.getLogger(name).setLevel(logging.WARNING)
    server = get_server("medlora-web", client_type="vue3")
    token = None if access.is_local(args.host) else access.new_token()
    app = MedLoRAWeb(server, config)

    def announce(**_) -> None:
        port = server.port
        query = f"?token={token}" if token else ""
        print(f"medlora web: open http://{args.host}:{port}/{query}", flush=True)
        if token:
            print(f"medlora web: listening on {args.host}: only a browser with the token above gets in.", flush=True)

    if token:
        def bind(wslink_server, **_) -> None:
            wslink_server.app.middlewares.append(access.token_middleware(token))
        server.controller.on_server_bind.add(bind)
    server.controller.on_server_ready.add(announce)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False,
                     disable_logging=True, timeout=0)
    except OSError as exc:
        raise MedLoRAError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}): choose another --port, "
                           "or stop the program using it.") from None
    finally:
        app.close()
    return 0
