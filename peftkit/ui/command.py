"""``peftkit ui``: arguments and start-up."""

from __future__ import annotations

import argparse

HELP = """A web page over a folder of runs: the runs table (sortable, filterable, live while runs train), each run's
curves, per-class table and confusion matrix, a comparison of runs, the searches, and a try-it box. It binds to
127.0.0.1 and reads nothing outside --runs."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", default="runs", help="the folder of run folders and search folders (default: runs)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--server", default=None, help="try-it through a running `peftkit serve` at this URL "
                        "(its adapters) instead of loading run folders in this process")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn

    from .app import LOCAL_HOSTS, create_app

    if not Path(args.runs).is_dir():
        raise FileNotFoundError(f"--runs {args.runs}: no such folder; give the folder your runs are written to "
                                "(output_dir of peftkit train, or a parent of several)")
    if args.server is not None and not args.server.startswith(("http://", "https://")):
        raise ValueError(f"--server {args.server!r}: give a URL such as http://127.0.0.1:8000")
    local = args.host in ("127.0.0.1", "localhost", "::1")
    app = create_app(args.runs, args.server, allowed_hosts=LOCAL_HOSTS if local else None)
    print(f"peftkit ui on http://{args.host}:{args.port} (runs: {Path(args.runs).resolve()})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
