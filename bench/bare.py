"""The floor: a bare aiohttp server (uvloop, as the gateway) that reads each request body and answers with
precomputed bytes, the same bytes the gateway sends for that scenario. `POST /bare/{name}`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler


def build_app(bodies: dict[str, bytes]) -> web.Application:
    def answer(body: bytes) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=body, content_type="application/json")

        return handler

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    for name, body in bodies.items():
        app.router.add_post(f"/bare/{name}", answer(body))
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", action="append", default=[], help="NAME=FILE, served at POST /bare/NAME")
    args = parser.parse_args()
    bodies = {}
    for spec in args.body:
        name, _, path = spec.partition("=")
        bodies[name] = Path(path).read_bytes()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(build_app(bodies), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
