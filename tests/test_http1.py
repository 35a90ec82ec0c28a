"""The upstream's keep-alive HTTP/1.1 client, against servers that write exact bytes: body framings, encodings,
connection reuse and its failures, timeouts, TLS verification."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from gateway import http1

from .certs import make_certificate

Reply = Callable[[bytes, int], Awaitable[bytes | None]]  # (request, its number) -> bytes to send; None: hang up


@dataclass
class Wire:
    """A server on a free port that reads each request whole and answers what `reply` says."""

    reply: Reply
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    close_after: set[int] = field(default_factory=set)  # request numbers after whose answer the server hangs up
    server: asyncio.Server | None = None

    async def start(self) -> Wire:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                number = len(self.requests)
                answer = await self.reply(request, number)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if number in self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/embeddings"


MakeWire = Callable[[Reply], Awaitable[Wire]]
MakeClient = Callable[[str], http1.Client]


@pytest.fixture
async def wire() -> AsyncIterator[MakeWire]:
    started: list[Wire] = []

    async def make(reply: Reply) -> Wire:
        started.append(await Wire(reply).start())
        return started[-1]

    yield make
    for w in started:
        assert w.server is not None
        w.server.close()
        await w.server.wait_closed()


def answer(body: bytes, *head: str, status: str = "200 OK", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{version} {status}", *head]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in head):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def always(data: bytes) -> Reply:
    async def reply(request: bytes, number: int) -> bytes:
        return data

    return reply


@pytest.fixture
async def client() -> AsyncIterator[MakeClient]:
    made: list[http1.Client] = []

    def make(url: str) -> http1.Client:
        made.append(http1.Client(url, {"Content-Type": "application/json", "Authorization": "Bearer k"}))
        return made[-1]

    yield make
    for c in made:
        await c.close()


async def test_the_request_on_the_wire_and_one_connection_for_sequential_calls(
    wire: MakeWire, client: MakeClient
) -> None:
    w = await wire(always(answer(b'{"ok": 1}', "Content-Type: application/json", "X-Thing: a", "x-thing: b")))
    c = client(w.url + "?v=2")
    for i in range(3):
        got = await c.post(b'{"i": %d}' % i, 5)
        assert got == http1.Answer(200, {"content-type": "application/json", "x-thing": "a, b",
                                         "content-length": "9"}, b'{"ok": 1}')
    assert w.connections == 1
    head, _, body = w.requests[2].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/embeddings?v=2 HTTP/1.1" and body == b'{"i": 2}'
    assert {f"Host: 127.0.0.1:{w.port}", "Content-Type: application/json", "Authorization: Bearer k",
            "Content-Length: 8", "Accept-Encoding: gzip, deflate"} <= set(lines[1:])


async def test_chunked_gzip_deflate_and_read_to_close_bodies(wire: MakeWire, client: MakeClient) -> None:
    payload = b'{"data": "' + b"x" * 5000 + b'"}'
    rest = payload[4:]
    chunked = b"4;ext=1\r\n" + payload[:4] + b"\r\n" + b"%x\r\n" % len(rest) + rest + b"\r\n0\r\nT: 1\r\n\r\n"
    answers = [
        answer(chunked, "Transfer-Encoding: chunked"),
        answer(gzip.compress(payload), "Content-Encoding: gzip"),
        answer(zlib.compress(payload), "Content-Encoding: deflate"),
        answer(zlib.compress(payload)[2:-4], "Content-Encoding: deflate"),  # raw deflate, as some servers send
        answer(b"", "Content-Length: 0", status="204 No Content"),
        b"HTTP/1.0 200 OK\r\nX-Framing: none\r\n\r\n" + payload,  # no length: the body ends when the server hangs up
    ]

    async def reply(request: bytes, number: int) -> bytes:
        return answers[number - 1]

    w = await wire(reply)
    w.close_after = {6}
    c = client(w.url)
    bodies = [(await c.post(b"{}", 5)).body for _ in answers]
    assert bodies == [payload] * 4 + [b"", payload]
    assert w.connections == 1


async def test_a_connection_the_server_closed_while_idle_is_replaced_without_an_error(
    wire: MakeWire, client: MakeClient
) -> None:
    async def reply(request: bytes, number: int) -> bytes | None:
        return None if number == 2 else answer(b"fine")  # the 2nd request meets a connection being closed

    w = await wire(reply)
    c = client(w.url)
    assert (await c.post(b"1", 5)).body == b"fine"
    assert (await c.post(b"2", 5)).body == b"fine"  # sent again, once, on a new connection
    assert w.connections == 2 and len(w.requests) == 3


async def test_connection_close_and_http10_answers_are_not_reused(wire: MakeWire, client: MakeClient) -> None:
    answers = [answer(b"a", "Connection: close"), answer(b"b", version="HTTP/1.0"),
               answer(b"c", "Connection: keep-alive", version="HTTP/1.0"), answer(b"d")]

    async def reply(request: bytes, number: int) -> bytes:
        return answers[number - 1]

    w = await wire(reply)
    w.close_after = {1, 2}
    c = client(w.url)
    assert [(await c.post(b"{}", 5)).body for _ in answers] == [b"a", b"b", b"c", b"d"]
    assert w.connections == 3


@pytest.mark.parametrize(("wire_bytes", "error"), [
    (answer(b"short")[:-2], http1.Disconnected),  # fewer bytes than Content-Length, then the server hangs up
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", http1.Disconnected),
    (b"SMTP ready\r\n\r\n", http1.BadAnswer),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", http1.BadAnswer),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", http1.BadAnswer),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", http1.BadAnswer),
    (answer(b"not gzip", "Content-Encoding: gzip"), http1.BadAnswer),
    (answer(b"x", "Content-Encoding: br"), http1.BadAnswer),
])
async def test_broken_answers_raise_and_the_connection_is_dropped(
    wire: MakeWire, client: MakeClient, wire_bytes: bytes, error: type[Exception]
) -> None:
    async def reply(request: bytes, number: int) -> bytes:
        return wire_bytes if number == 1 else answer(b"next")

    w = await wire(reply)
    w.close_after = {1}
    c = client(w.url)
    with pytest.raises(error):
        await c.post(b"{}", 5)
    assert (await c.post(b"{}", 5)).body == b"next"
    assert w.connections == 2


async def test_no_answer_in_time_raises_timeout_and_drops_the_connection(wire: MakeWire, client: MakeClient) -> None:
    hung = asyncio.Event()

    async def reply(request: bytes, number: int) -> bytes:
        if number == 1:
            await hung.wait()
        return answer(b"late" if number == 1 else b"next")

    w = await wire(reply)
    c = client(w.url)
    with pytest.raises(TimeoutError):
        await c.post(b"{}", 0.05)
    hung.set()  # the late answer goes to a connection the client no longer has
    assert (await c.post(b"{}", 5)).body == b"next"
    assert w.connections == 2


async def test_nobody_listening_is_a_connect_failure(client: MakeClient) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(http1.ConnectFailed):
        await client(f"http://127.0.0.1:{port}/v1/embeddings").post(b"{}", 5)


async def test_a_cancelled_call_leaves_no_connection_behind(wire: MakeWire, client: MakeClient) -> None:
    gate, arrived = asyncio.Event(), asyncio.Event()

    async def reply(request: bytes, number: int) -> bytes:
        arrived.set()
        await gate.wait()
        return answer(b"ok")

    w = await wire(reply)
    c = client(w.url)
    call = asyncio.ensure_future(c.post(b"{}", 5))
    await arrived.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    gate.set()
    assert (await c.post(b"{}", 5)).body == b"ok"
    assert w.connections == 2


# ---- TLS ---------------------------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(CA, certificate for 127.0.0.1 signed by it, key): a CA of the test's own."""
    return make_certificate(tmp_path)


async def test_https_verifies_the_server_against_the_trusted_cas(
    certificate: tuple[Path, Path, Path], client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=b"secret " + await request.read())

    app = web.Application()
    app.router.add_post("/v1/embeddings", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/v1/embeddings"
    try:
        with pytest.raises(http1.ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await client(url).post(b"x", 5)  # a CA nobody trusts
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # what ssl.create_default_context() trusts
        trusting = client(url)
        assert [(await trusting.post(b"%d" % i, 5)).body for i in range(2)] == [b"secret 0", b"secret 1"]
    finally:
        await runner.cleanup()


async def test_answers_in_one_read_in_pieces_after_an_interim_answer_or_with_bytes_after_them(
    client: MakeClient,
) -> None:
    """The parser's one-read path and its general path: an interim 100 and the answer in one read; an answer
    trickled in pieces (head, then body, split mid-way); an answer with stray bytes after it (not reused)."""
    whole = answer(b'{"n": 1}')
    plans: list[list[bytes]] = [
        [b"HTTP/1.1 100 Continue\r\n\r\n" + whole],
        [whole[:10], whole[10:-5], whole[-5:]],
        [whole + b"HTTP/1.1 200 OK\r\n"],
        [whole],
    ]
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while plans:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                for piece in plans.pop(0):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        c = client(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/embeddings")
        bodies = [(await c.post(b"{}", 5)).body for _ in range(4)]
        assert bodies == [b'{"n": 1}'] * 4
        assert connections == 2  # the answer with bytes after it was not reused
    finally:
        server.close()
        await server.wait_closed()
