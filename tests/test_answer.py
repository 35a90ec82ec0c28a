"""JsonAnswer: the embeddings answer written in one transport call must be the HTTP message aiohttp's own
`web.Response` would have sent, byte for byte in its body and header for header, on asyncio and on uvloop
(whose transport takes the pieces without joining them)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiohttp import web

from gateway.answer import JsonAnswer, header_lines

from .conftest import Gateway

BODY_PARTS: list[bytes | memoryview] = [b'{"model":"m","data":[', memoryview(b'xx{"embedding":"AAAA"}yy')[2:-2], b"]}"]
BODY = b"".join(BODY_PARTS)
FIXED = {"X-Cache-Hits": "1", "X-Cache-Misses": "0"}


def loops() -> list[Callable[[], asyncio.AbstractEventLoop]]:
    out: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed wherever `serve` runs
        return out
    return [*out, uvloop.new_event_loop]


async def exchange(handler: Callable[[web.Request], object], raw_requests: list[bytes]) -> list[bytes]:
    """Serves `handler`, sends each raw request on one connection, returns what came back after each (read
    until the answer is whole by its Content-Length, or until the server closed)."""
    app = web.Application()
    app.router.add_post("/", handler)  # type: ignore[arg-type]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for raw in raw_requests:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            answers.append(head + await reader.readexactly(length))
        # Closed by the server (b"") or still open after half a second (the server had nothing to wait for).
        answers.append(await asyncio.wait_for(reader.read(), 0.5))
    except TimeoutError:
        answers.append(b"<open>")
    finally:
        writer.close()
        await runner.cleanup()
    return answers


def parse(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    headers.pop("Date")  # the second it was sent
    return status, headers, body


def post(version: str = "1.1", connection: str | None = None) -> bytes:
    extra = f"Connection: {connection}\r\n" if connection else ""
    return (f"POST / HTTP/{version}\r\nHost: x\r\nContent-Length: 2\r\n{extra}\r\n{{}}").encode()


def both(request_id: str) -> tuple[Callable[[web.Request], object], Callable[[web.Request], object]]:
    """The same answer made by JsonAnswer and by aiohttp's web.Response (headers set afterwards, as the route
    wrapper sets the request id)."""

    async def ours(request: web.Request) -> web.StreamResponse:
        await request.read()
        answer = JsonAnswer(BODY_PARTS, header_lines(FIXED))
        answer.identify(request_id)
        answer.headers["X-Extra"] = "set after"
        return answer

    async def theirs(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.Response(body=BODY, headers={"Content-Type": "application/json", **FIXED})
        response.headers["X-Request-Id"] = request_id
        response.headers["X-Extra"] = "set after"
        return response

    return ours, theirs


@pytest.mark.parametrize("new_loop", loops(), ids=lambda f: f.__module__.split(".")[0])
@pytest.mark.parametrize(("version", "connection", "closes"), [
    ("1.1", None, False),
    ("1.1", "close", True),
    ("1.0", None, True),
    ("1.0", "keep-alive", False),
])
def test_the_answer_is_what_aiohttp_would_send(
    new_loop: Callable[[], asyncio.AbstractEventLoop], version: str, connection: str | None, closes: bool
) -> None:
    ours, theirs = both("req-1")
    requests = [post(version, connection)] * (1 if closes else 2)
    with asyncio.Runner(loop_factory=new_loop) as runner:
        got = runner.run(exchange(ours, requests))
        expected = runner.run(exchange(theirs, requests))
    for answer, reference in zip(got[:-1], expected[:-1], strict=True):
        assert parse(answer) == parse(reference)
        status, headers, body = parse(answer)
        assert status == f"HTTP/{version} 200 OK"
        assert body == BODY
        assert headers["Content-Length"] == str(len(BODY))
        assert headers["X-Request-Id"] == "req-1" and headers["X-Extra"] == "set after"
        assert headers["X-Cache-Hits"] == "1"
    # The connection is closed exactly when aiohttp would close it, and stays open otherwise.
    assert got[-1] == expected[-1] == (b"" if closes else b"<open>")


def test_a_header_that_would_split_the_block_is_refused() -> None:
    assert header_lines({"A": "1", "B": "two words"}) == "A: 1\r\nB: two words\r\n"
    for bad in ({"A": "1\r\nSet-Cookie: x=1"}, {"A": "1\n"}, {"A\r": "1"}):
        with pytest.raises(ValueError, match="CR or LF"):
            header_lines(bad)
    for bad_id in ("a\r\nSet-Cookie: x=1", "a\n", "a\rb"):
        with pytest.raises(ValueError, match="CR or LF"):
            JsonAnswer(BODY_PARTS, "").identify(bad_id)


def test_an_echoed_header_goes_back_as_its_bytes_came() -> None:
    # aiohttp decodes request headers as UTF-8 with surrogateescape; a request id is echoed as it was sent.
    sent = b"id-\xc3\xa9-\xff"

    async def echo(request: web.Request) -> web.StreamResponse:
        answer = JsonAnswer(BODY_PARTS, "")
        answer.identify(request.headers["X-Request-Id"])
        return answer

    raw = b"POST / HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + sent + b"\r\nContent-Length: 0\r\n\r\n"
    with asyncio.Runner() as runner:
        answer = runner.run(exchange(echo, [raw]))[0]
    assert b"\r\nX-Request-Id: " + sent + b"\r\n" in answer


async def test_the_gateway_registers_no_response_prepare_hook(gateway: Gateway, redis_url: str) -> None:
    """JsonAnswer does not run `on_response_prepare`: a hook added to the app would silently miss every
    embeddings answer. If one is ever needed, JsonAnswer.prepare must call it too."""
    client = await gateway(cache={"url": redis_url})
    assert len(client.app.on_response_prepare) == 0
