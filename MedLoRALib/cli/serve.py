"""``medlora serve``: the scoring engine on stdin/stdout (JSON lines, docs/architecture.md).

stdout carries protocol lines only: the process's own stdout file descriptor is
pointed at stderr before anything else runs, so stray prints and library output
(C code included) land in the log, never in the protocol stream.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

from ..serve import DEFAULT_MAX_REQUEST_BYTES, EngineServer, read_requests


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps or auto (default: auto, "
                        "or $MEDLORA_DEVICE)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME_OR_PATH",
                        help="attach this adapter at start (repeatable); the last one is active")
    parser.add_argument("--weights", default=None, help="backbone weights file for the adapters given at start")
    parser.add_argument("--store", default=None, help="adapter store folder (default: the user's data folder)")
    parser.add_argument("--max-batch-images", type=int, default=288,
                        help="images per forward pass (patches x planes x TTA variants)")
    parser.add_argument("--max-request-bytes", type=_positive_bytes, default=DEFAULT_MAX_REQUEST_BYTES,
                        metavar="BYTES", help="longest request line accepted; a longer one is skipped unread and "
                        f"answered with an error (default {DEFAULT_MAX_REQUEST_BYTES} = 256 MiB: a 9-view batch "
                        "of 64 nodules at 224 px in base64 needs 147 MiB)")


def _positive_bytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r}") from None
    if value < 1024:
        raise argparse.ArgumentTypeError(f"must be at least 1024 bytes, got {value}")
    return value


def _protocol_stream() -> io.TextIOBase:
    """A private handle on the real stdout; fd 1 (and sys.stdout) then point at stderr."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return io.TextIOWrapper(os.fdopen(protocol_fd, "wb", buffering=0), encoding="utf-8", line_buffering=True,
                            write_through=True)


def run(args: argparse.Namespace) -> int:
    protocol = _protocol_stream()
    from ..adapters.store import AdapterStore
    from ..engine import ScoringEngine

    engine = ScoringEngine(device=args.device, max_batch_images=args.max_batch_images,
                           store=AdapterStore(args.store) if args.store else None)
    for adapter in args.adapter:
        engine.attach_adapter(adapter, weights=args.weights)
    server = EngineServer(engine, protocol.write)
    try:  # bytes split on b"\n" only: a raw \r inside a request must not cut it in two
        return server.run(read_requests(sys.stdin.buffer, args.max_request_bytes))
    except BrokenPipeError:  # the client went away: nothing left to answer
        return 0
