"""`embedding-gateway serve | keys new | keys hash | admin ... | sim | check-config`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from . import config as cfg

# Where `serve` looks when no --config is given: the embedded demo config, relative to the working directory.
DEFAULT_CONFIG = "config/demo.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedding-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", "-c", help=f"YAML config file (default: {DEFAULT_CONFIG} in the working directory)")
    serve.add_argument("--host", help="override listen.host")
    serve.add_argument("--port", type=int, help="override listen.port")
    serve.add_argument("--workers", "-w", type=int, default=1,
                       help="worker processes sharing the port (SO_REUSEPORT); metrics are summed over them")
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config")
    check.set_defaults(func=_check)

    keys = sub.add_parser("keys", help="team key helpers")
    keys_sub = keys.add_subparsers(dest="keys_command")
    new = keys_sub.add_parser("new", help="print a new random key and the line to paste into the config")
    new.set_defaults(func=_keys_new)
    hash_ = keys_sub.add_parser("hash", help="print the config line for an existing key (read from stdin)")
    hash_.set_defaults(func=_keys_hash)

    from .admin_cli import add_parser as add_admin

    add_admin(sub)

    sim = sub.add_parser("sim", help="run a simulated upstream (jina, openai or tei) as its own server")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8090)
    sim.add_argument("--latency-ms", type=float, default=0.0, help="base latency per call")
    sim.add_argument("--latency-per-token-ms", type=float, default=0.0)
    sim.add_argument("--rpm", type=int, default=None, help="requests per minute before answering 429")
    sim.add_argument("--api-key", action="append", default=None, help="require this bearer key (repeat for a pool)")
    sim.add_argument("--kind", choices=("jina", "openai", "tei"), default="jina", help="the wire format served")
    sim.add_argument("--bill-gone", action="store_true",
                     help="bill answers whose caller has gone, as a real upstream does")
    sim.add_argument("--no-tokenize", action="store_true", help="serve no TEI /tokenize (404)")
    sim.set_defaults(func=_sim)
    return parser


def _load(path: str) -> cfg.Config:
    try:
        return cfg.load_config(path)
    except (cfg.ConfigError, OSError) as exc:
        for problem in str(exc).splitlines():
            print(f"embedding-gateway: {path}: {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    from .server import run, setup_logging

    path = args.config or _default_config()
    config = _load(path)
    setup_logging(config.log_level)
    host = args.host or config.listen.host
    port = args.port if args.port is not None else config.listen.port
    # SIGTERM/SIGINT drain (exit 0 when every in-flight request finished); SIGHUP reloads the config file.
    return run(config, path, host=host, port=port, workers=args.workers)


def _default_config() -> str:
    if not Path(DEFAULT_CONFIG).is_file():
        print(f"embedding-gateway: no --config given and no {DEFAULT_CONFIG} in {Path.cwd()}: run from a clone of the "
              "repository (it ships the demo config), or pass --config PATH to your own file (start from "
              "config/gateway.yaml; check it with `embedding-gateway check-config PATH`)", file=sys.stderr)
        raise SystemExit(2)
    return DEFAULT_CONFIG


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    upstreams = ", ".join(f"{u.name} {u.url}" for u in config.routes)
    print(f"{args.config}: ok ({len(config.teams)} teams, upstream {upstreams})")
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from .auth import hash_key, new_key

    key = new_key()
    print(f"key:         {key}")
    print(f'config line: keys: ["{hash_key(key)}"]')
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    from .auth import hash_key

    key = sys.stdin.readline().strip()
    print(hash_key(key))
    return 0


def _sim(args: argparse.Namespace) -> int:
    from .sim import SimConfig, run_sim

    _install_uvloop()
    run_sim(
        args.host,
        args.port,
        SimConfig(
            latency_base_ms=args.latency_ms,
            latency_per_token_ms=args.latency_per_token_ms,
            rate_limit_requests=args.rpm,
            api_keys=tuple(args.api_key or ()),
            kind=args.kind,
            bill_gone=args.bill_gone,
            tokenize=not args.no_tokenize,
        ),
    )
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
