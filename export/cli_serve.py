"""``deepinsert serve BUNDLE_DIR [--host 127.0.0.1 --port 8000]``: the router over HTTP."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path

from deepinsert.errors import InputError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle_dir", type=Path, help="router bundle written by `deepinsert export`")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=64, help="most prompts per request (default 64)")
    parser.add_argument("--max-body-bytes", type=int, default=256 * 1024, help="largest request body (default 256 KiB)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per call (default 1)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    from deepinsert.utils.extras import require

    uvicorn = require("uvicorn", "serve")
    from deepinsert.export.runtime import Router
    from deepinsert.export.service import create_app

    router = Router.load(args.bundle_dir, num_threads=args.threads)
    app = create_app(router, max_batch=args.max_batch, max_body_bytes=args.max_body_bytes)
    if not _is_loopback(args.host):
        log.warning("binding %s: the router is reachable from other machines (no authentication)", args.host)
    print(f"serving {router} on http://{args.host}:{args.port} (POST /route, GET /health, GET /info)")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
