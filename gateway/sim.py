"""A simulated embeddings API for tests, benchmarks and the demo: deterministic vectors, the real validation
rules, a sliding-window rate limit and injectable faults, so nothing paid is called.

Three kinds: `jina` (the Jina API, which also takes OpenAI's field names), `openai` (the same, as an
OpenAI-compatible server), `tei` (Text Embeddings Inference's native `POST /embed` and `POST /tokenize`)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson
import xxhash
from aiohttp import web

Vector = npt.NDArray[np.float32]
Item = str | dict[str, Any] | list[int]

NATIVE_DIMS: Final[dict[str, int]] = {
    "jina-embeddings-v5-text-small": 1024,
    "jina-embeddings-v5-text-nano": 768,
    "jina-embeddings-v4": 2048,
    "jina-embeddings-v3": 1024,
    "jina-clip-v2": 1024,
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "bge-m3": 1024,
}
SIM_KINDS: Final = ("jina", "openai", "tei")
# Models whose per-request input limit differs from SimConfig.default_max_inputs.
MODEL_MAX_INPUTS: Final[dict[str, int]] = {"jina-embeddings-v4": 512}
TASKS: Final = frozenset(
    {
        "retrieval.query",
        "retrieval.passage",
        "text-matching",
        "classification",
        "clustering",
        "code.query",
        "code.passage",
    }
)
EMBEDDING_TYPES: Final = ("float", "base64", "binary", "ubinary")
ENCODING_FORMATS: Final = ("float", "base64")  # OpenAI's name for the output format
MIN_DIMENSIONS: Final = 32
MULTIVECTOR_DIM: Final = 128
MULTIVECTOR_MAX_ROWS: Final = 16
IMAGE_TOKENS: Final = 1000
PDF_TOKENS: Final = 2000
FAULT_KINDS: Final = frozenset({"status", "close", "malformed", "short", "delay"})

_TOKEN_RE: Final = re.compile(r"\w+|[^\w\s]")
_BOOL_FIELDS: Final = ("normalized", "late_chunking", "return_multivector", "truncate")
_UNNORMALIZED_SCALE: Final = np.float32(3.0)
_DUMPS_OPTS: Final = orjson.OPT_SERIALIZE_NUMPY
_DEFAULT_FAULT_BODY: Final[dict[str, Any]] = {"detail": "simulated error", "code": "UPSTREAM_ERROR"}
_MALFORMED_BODY: Final = b'{"model": '
_PARTIAL_BODY: Final = b'{"model": "jina-embeddings-v3", "object": "list", "usage": {"total_tokens": '
# Bodies of 2048 inputs (or base64 images) exceed aiohttp's 1 MiB default; the real API takes them.
_MAX_BODY_BYTES: Final = 256 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    latency_base_ms: float = 0.0
    latency_per_token_ms: float = 0.0
    max_inputs: dict[str, int] = field(default_factory=dict)
    default_max_inputs: int = 2048
    max_tokens_per_input: int = 8192
    rate_limit_requests: int | None = None
    rate_window_s: float = 60.0
    api_key: str | None = None
    # Several accepted keys (a pool); with `api_key`, both are accepted. Calls are counted per key.
    api_keys: tuple[str, ...] = ()
    kind: str = "jina"  # one of SIM_KINDS
    rate_limit_per_key: bool = False  # `rate_limit_requests` counts each bearer key apart, as providers do
    tei_model: str = "bge-m3"  # the one model a `tei` sim serves
    tokenize: bool = True  # False: no `POST /tokenize` (404), as a TEI behind a proxy that passes only /embed
    # A real upstream bills what it computed even when the caller hung up before the answer; False drops it.
    bill_gone: bool = False


@dataclass
class Fault:
    kind: str  # "status" | "close" | "malformed" | "short" | "delay"
    status: int = 500
    body: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    delay_s: float = 0.0
    key: str | None = None  # only calls with this bearer key meet the fault (None: any call)


class SimError(ValueError):
    """An error answer of the simulated API: what the client is told, and with which status."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        field_name: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.field_name = field_name
        self.headers = headers or {}


@dataclass(frozen=True)
class _Parsed:
    """A validated request: everything that decides the answer."""

    model: str
    items: list[Item]
    tokens: list[int]
    task: str | None
    dimensions: int
    normalized: bool
    output: str
    late_chunking: bool
    multivector: bool


class _InvalidJson:
    """Marks a body that did not parse, so it can be told apart from a JSON null."""


_INVALID_JSON: Final = _InvalidJson()


# ---------------------------------------------------------------- validation


def _invalid(field_name: str, message: str) -> SimError:
    return SimError(422, "VALIDATION_ERROR", f"{field_name}: {message}", field_name=field_name)


def _optional(body: dict[str, Any], name: str, kind: type, kind_name: str) -> Any:
    # null counts as absent, as in the real (pydantic) API; type() keeps bool apart from int.
    value = body.get(name)
    if value is not None and type(value) is not kind:
        raise _invalid(name, f"must be {kind_name}")
    return value


def _choice(body: dict[str, Any], name: str, choices: tuple[str, ...] | frozenset[str]) -> str | None:
    value = _optional(body, name, str, "a string")
    if value is not None and value not in choices:
        raise _invalid(name, f"must be one of {', '.join(sorted(choices))}")
    return value  # type: ignore[no-any-return]


def _check_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise _invalid("model", "field required")
    # An org prefix ("jinaai/jina-embeddings-v3", as self-hosted servers name it) is the same model.
    if not isinstance(model, str) or model.rsplit("/", 1)[-1] not in NATIVE_DIMS:
        raise _invalid("model", f"must be one of {', '.join(NATIVE_DIMS)}")
    return model.rsplit("/", 1)[-1]


def _check_item(item: Any, name: str, token_ids: bool) -> Item:
    if token_ids and isinstance(item, list):
        if not item or not all(type(t) is int and t >= 0 for t in item):
            raise _invalid(name, "must be a non-empty list of token ids")
        return item
    if isinstance(item, str):
        if not item:
            raise _invalid(name, "must not be empty")
        return item
    if not isinstance(item, dict):
        raise _invalid(name, "must be a non-empty string or an object")
    for key in ("text", "image", "pdf"):
        if key in item:
            if not isinstance(item[key], str) or not item[key]:
                raise _invalid(name, f"{key} must be a non-empty string")
            break
    return item


def _check_input(body: dict[str, Any], limit: int, token_ids: bool) -> list[Item]:
    value = body.get("input")
    if value is None:
        raise _invalid("input", "field required")
    if isinstance(value, str) or (token_ids and isinstance(value, list) and value and type(value[0]) is int):
        return [_check_item(value, "input", token_ids)]
    if not isinstance(value, list) or not value:
        raise _invalid("input", "must be a string or a non-empty list")
    if len(value) > limit:
        raise _invalid("input", f"at most {limit} inputs per request, got {len(value)}")
    return [_check_item(item, f"input[{i}]", token_ids) for i, item in enumerate(value)]


def _check_dimensions(body: dict[str, Any], native: int) -> int:
    dims = _optional(body, "dimensions", int, "an integer")
    if dims is None:
        return native
    if not MIN_DIMENSIONS <= dims <= native:
        raise _invalid("dimensions", f"must be between {MIN_DIMENSIONS} and {native}")
    return dims  # type: ignore[no-any-return]


def _output_format(body: dict[str, Any]) -> str:
    # The openai SDK sends encoding_format; Jina's own field wins when both are present.
    encoding = _choice(body, "encoding_format", ENCODING_FORMATS)
    return _choice(body, "embedding_type", EMBEDDING_TYPES) or encoding or "float"


def _item_tokens(item: Item) -> int:
    if isinstance(item, list):
        return len(item)  # tokenizer ids: one token each
    if isinstance(item, str):
        return len(_TOKEN_RE.findall(item)) + 2
    if "text" in item:
        return _item_tokens(str(item["text"]))
    if "image" in item:
        return IMAGE_TOKENS
    if "pdf" in item:
        return PDF_TOKENS
    return _item_tokens(orjson.dumps(item, option=orjson.OPT_SORT_KEYS).decode())


def _billed_tokens(items: list[Item], cap: int, truncate: bool) -> list[int]:
    tokens = [_item_tokens(item) for item in items]
    if truncate:
        return [min(t, cap) for t in tokens]
    for i, t in enumerate(tokens):
        if t > cap:
            raise _invalid(f"input[{i}]", f"{t} tokens exceed the limit of {cap}; set truncate to cut it")
    return tokens


def _max_inputs(config: SimConfig, model: str) -> int:
    return config.max_inputs.get(model, MODEL_MAX_INPUTS.get(model, config.default_max_inputs))


def _parse(body: Any, config: SimConfig) -> _Parsed:
    if isinstance(body, _InvalidJson):
        raise SimError(400, "INVALID_JSON", "request body is not valid JSON")
    if not isinstance(body, dict):
        raise _invalid("body", "must be a JSON object")
    model = _check_model(body)
    items = _check_input(body, _max_inputs(config, model), config.kind != "jina")
    flags = {name: _optional(body, name, bool, "a boolean") for name in _BOOL_FIELDS}
    return _Parsed(
        model=model,
        items=items,
        tokens=_billed_tokens(items, config.max_tokens_per_input, flags["truncate"] is True),
        task=_choice(body, "task", TASKS),
        dimensions=_check_dimensions(body, NATIVE_DIMS[model]),
        normalized=flags["normalized"] is not False,
        output=_output_format(body),
        late_chunking=flags["late_chunking"] is True,
        multivector=flags["return_multivector"] is True,
    )


# ---------------------------------------------------------------- vectors


def _seed(parts: list[Any]) -> int:
    return xxhash.xxh3_64_intdigest(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS))


def _seed_item(item: Item) -> Item:
    # {"text": s} is the same content as s, so it must embed the same whichever form a client sends.
    if isinstance(item, dict) and item.keys() == {"text"}:
        return item["text"]  # type: ignore[no-any-return]
    return item


def _shape(raw: Vector, normalized: bool) -> Vector:
    if not normalized:
        # x3 keeps unnormalized vectors visibly off the unit sphere, so the flag changes the bytes.
        return raw * _UNNORMALIZED_SCALE
    unit: Vector = (raw / np.linalg.norm(raw, axis=-1, keepdims=True)).astype(np.float32, copy=False)
    return unit


def _random(parts: list[Any], size: int) -> Vector:
    return np.random.default_rng(_seed(parts)).standard_normal(size, dtype=np.float32)


def _vectors(req: _Parsed) -> list[Vector]:
    """One vector per item (a (rows, 128) matrix with multivector), seeded by
    [model, task, dimensions, normalized, item] (+ [index, context digest] with late chunking)
    (+ ["multivector", row] per row)."""
    items = [_seed_item(item) for item in req.items]
    base: list[Any] = [req.model, req.task, req.dimensions, req.normalized]
    # One digest of the whole list keeps late chunking linear in the number of inputs.
    context = xxhash.xxh3_64_hexdigest(orjson.dumps(items, option=orjson.OPT_SORT_KEYS))
    out: list[Vector] = []
    for i, item in enumerate(items):
        parts = [*base, item, *([i, context] if req.late_chunking else [])]
        if req.multivector:
            rows = min(req.tokens[i], MULTIVECTOR_MAX_ROWS)
            raw = np.stack([_random([*parts, "multivector", r], MULTIVECTOR_DIM) for r in range(rows)])
        else:
            raw = _random(parts, NATIVE_DIMS[req.model])[: req.dimensions]
        out.append(_shape(raw, req.normalized))
    return out


# ---------------------------------------------------------------- rendering


def _b64(vec: Vector) -> str:
    return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")


def _render(vec: Vector, output: str) -> Any:
    """The embedding field for one input; 2-D (multivector) arrays serialise as a list of rows."""
    if output == "float":
        # float64 so orjson prints each float32 as the shortest repr of its exact float64 value.
        return vec.astype(np.float64)
    if output == "base64":
        return _b64(vec) if vec.ndim == 1 else [_b64(row) for row in vec]
    bits = np.packbits(vec > 0, axis=-1)
    if output == "ubinary":
        return bits
    return (bits.astype(np.int16) - 128).astype(np.int8)


def _response_body(req: _Parsed, vectors: list[Vector], *, drop_last: bool = False) -> bytes:
    total = sum(req.tokens)
    data = [
        {"object": "embedding", "index": i, "embedding": _render(vec, req.output)}
        for i, vec in enumerate(vectors)
    ]
    if drop_last:
        data.pop()
    resp = {
        "model": req.model,
        "object": "list",
        "usage": {"total_tokens": total, "prompt_tokens": total},
        "data": data,
    }
    return orjson.dumps(resp, option=_DUMPS_OPTS)


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def _error_response(exc: SimError) -> web.Response:
    body: dict[str, Any] = {"detail": exc.detail, "code": exc.code}
    if exc.field_name is not None:
        body["errors"] = [{"field": exc.field_name, "message": exc.detail}]
    return _json(body, exc.status, exc.headers)


async def _close_midway(request: web.Request) -> web.StreamResponse:
    # Promise more bytes than are sent, then hang up: the client sees a truncated payload.
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    resp.content_length = len(_PARTIAL_BODY) * 4
    await resp.prepare(request)
    await resp.write(_PARTIAL_BODY)
    if request.transport is not None:
        request.transport.close()
    return resp


# ---------------------------------------------------------------- the simulator


class Simulator:
    """The simulated API's state: config, counters, recorded bodies, the rate window and queued faults."""

    config: SimConfig  # tests may swap it between calls
    calls: int  # every POST received, rejected ones included
    ok_calls: int  # fully normal 200 answers
    inputs: int  # inputs billed in those answers (and, with `bill_gone`, in answers whose caller had gone)
    tokens: int  # tokens billed with them
    requests: list[dict[str, Any]]  # every body that parsed as a JSON object, in order
    dropped: int  # answers whose caller had gone when they were ready (billed only with `bill_gone`)

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config or SimConfig()
        self._clock = clock
        self._sleep = sleep
        self._faults: deque[Fault] = deque()
        self._windows: dict[str, deque[float]] = {}  # by bearer key ("" unless rate_limit_per_key)
        # Cleared by pause(): answers wait (a crash test can stop the upstream mid-job, then kill the gateway).
        self._open = asyncio.Event()
        self._open.set()
        self._held: dict[int, web.Request] = {}  # by id(): requests are not hashable
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zeroes the counters and forgets recorded bodies (queued faults and the rate window stay)."""
        self.calls = 0
        self.ok_calls = 0
        self.inputs = 0
        self.tokens = 0
        self.requests = []
        self.dropped = 0
        self.key_calls: dict[str, int] = {}  # calls per bearer key presented (the sim's own bookkeeping)
        self.tokenize_calls = 0

    def pause(self) -> None:
        """Valid requests wait before they are answered (and billed) until `resume()`."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def stats(self) -> dict[str, int]:
        """The counters, and the paused requests (`held`) of which `held_gone` lost their caller."""
        gone = sum(1 for r in self._held.values() if r.transport is None or r.transport.is_closing())
        return {"calls": self.calls, "ok_calls": self.ok_calls, "inputs": self.inputs, "tokens": self.tokens,
                "dropped": self.dropped, "held": len(self._held), "held_gone": gone}

    def inject(self, *faults: Fault) -> None:
        for fault in faults:
            if fault.kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {fault.kind!r}; expected one of {sorted(FAULT_KINDS)}")
        self._faults.extend(faults)

    def clear_faults(self) -> None:
        """Drops the faults not yet served: the outage ends now."""
        self._faults.clear()

    @property
    def pending_faults(self) -> int:
        return len(self._faults)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        app.router.add_post("/v1/embeddings", self._handle)
        app.router.add_post("/embeddings", self._handle)
        # TEI's native routes: every sim serves them (the kind says what `embedding-gateway sim` announces).
        app.router.add_post("/embed", self._handle)
        if self.config.tokenize:
            app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/", self._health)
        # Control of a sim running as its own process (`embedding-gateway sim`): its counters, pause, resume.
        app.router.add_get("/_sim/stats", self._stats)
        app.router.add_post("/_sim/pause", self._control)
        app.router.add_post("/_sim/resume", self._control)
        return app

    async def _stats(self, request: web.Request) -> web.Response:
        return _json(self.stats())

    async def _control(self, request: web.Request) -> web.Response:
        if request.path.endswith("/pause"):
            self.pause()
        else:
            self.resume()
        return _json(self.stats())

    def token_count(self, item: str | dict[str, Any]) -> int:
        """Tokens one input costs before truncation (the per-input count the sim bills)."""
        return _item_tokens(item)

    def embed(self, body: dict[str, Any]) -> tuple[list[Vector], int]:
        """Vectors (float32; (rows, 128) with multivector) and billed tokens; raises SimError if invalid."""
        req = _parse(body, self.config)
        return _vectors(req), sum(req.tokens)

    async def _health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        body = await _read_json(request)
        if isinstance(body, dict):
            self.requests.append(body)
        key = _bearer(request)
        self.key_calls[key] = self.key_calls.get(key, 0) + 1
        fault = self._take_fault(key)
        if fault is not None:
            return await self._apply_fault(fault, request, body)
        return await self._answer(request, body)

    def _take_fault(self, key: str) -> Fault | None:
        for i, fault in enumerate(self._faults):
            if fault.key is None or fault.key == key:
                del self._faults[i]
                return fault
        return None

    async def _apply_fault(self, fault: Fault, request: web.Request, body: Any) -> web.StreamResponse:
        if fault.kind == "status":
            return _json(fault.body or _DEFAULT_FAULT_BODY, fault.status, fault.headers)
        if fault.kind == "close":
            return await _close_midway(request)
        if fault.kind == "malformed":
            return web.Response(body=_MALFORMED_BODY, content_type="application/json")
        if fault.kind == "delay":
            await self._sleep(fault.delay_s)
        return await self._answer(request, body, short=fault.kind == "short")

    async def _answer(self, request: web.Request, body: Any, *, short: bool = False) -> web.Response:
        tei = request.path == "/embed"
        try:
            self._authorize(request)
            self._admit(_bearer(request))
            req = _parse(_tei_request(body, self.config) if tei else body, self.config)
        except SimError as exc:
            return _error_response(exc)
        total = sum(req.tokens)
        delay_ms = self.config.latency_base_ms + self.config.latency_per_token_ms * total
        if delay_ms > 0:
            await self._sleep(delay_ms / 1000)
        if not self._open.is_set():
            await self._hold(request)
        if request.transport is None or request.transport.is_closing():
            self.dropped += 1  # the caller is gone: nothing is delivered
            if self.config.bill_gone:
                self.inputs += len(req.items)
                self.tokens += total
            return web.Response(status=499)
        if tei:
            payload = _tei_body(_vectors(req), drop_last=short)
        else:
            payload = _response_body(req, _vectors(req), drop_last=short)
        if not short:
            self.ok_calls += 1
            self.inputs += len(req.items)
            self.tokens += total
        return web.Response(body=payload, content_type="application/json")

    async def _hold(self, request: web.Request) -> None:
        self._held[id(request)] = request
        try:
            await self._open.wait()
        finally:
            del self._held[id(request)]

    def _authorize(self, request: web.Request) -> None:
        keys = [k for k in (self.config.api_key, *self.config.api_keys) if k is not None]
        if not keys:
            return
        token = _bearer(request)
        if not token:
            raise SimError(401, "AUTH_MISSING_API_KEY", "missing API key: send Authorization: Bearer <key>")
        if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
            raise SimError(401, "AUTH_INVALID_API_KEY", "invalid API key")

    async def _tokenize(self, request: web.Request) -> web.Response:
        """TEI's `POST /tokenize`: one list of tokens per input (the count is what an /embed call bills)."""
        self.tokenize_calls += 1
        try:
            self._authorize(request)
            req = _parse(_tei_request(await _read_json(request), self.config), self.config)
        except SimError as exc:
            return _error_response(exc)
        rows = [[{"id": i, "text": "", "special": False, "start": None, "stop": None} for i in range(n)]
                for n in req.tokens]
        return web.Response(body=orjson.dumps(rows), content_type="application/json")

    def _admit(self, key: str) -> None:
        """Sliding-window log; only admitted requests enter the window."""
        limit = self.config.rate_limit_requests
        if limit is None:
            return
        log = self._windows.setdefault(key if self.config.rate_limit_per_key else "", deque())
        now, window = self._clock(), self.config.rate_window_s
        while log and log[0] <= now - window:
            log.popleft()
        if len(log) < limit:
            log.append(now)
            return
        oldest = log[0] if log else now
        retry_after = max(1, math.ceil(oldest + window - now))
        raise SimError(
            429,
            "RATE_REQUEST_LIMIT_EXCEEDED",
            f"rate limit of {limit} requests per {window:g} s exceeded; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


# ---------------------------------------------------------------- TEI's native API


def _tei_request(body: Any, config: SimConfig) -> Any:
    """A TEI `/embed` or `/tokenize` body as the Jina request it means (TEI serves one model; normalizes by default)."""
    if not isinstance(body, dict):
        return body
    inputs = body.get("inputs")
    out: dict[str, Any] = {"model": config.tei_model, "input": [inputs] if isinstance(inputs, str) else inputs}
    for tei_name, name in (("normalize", "normalized"), ("truncate", "truncate"), ("dimensions", "dimensions")):
        if tei_name in body:
            out[name] = body[tei_name]
    return out


def _tei_body(vectors: list[Vector], *, drop_last: bool = False) -> bytes:
    rows = [v.astype(np.float64) for v in vectors]
    return orjson.dumps(rows[:-1] if drop_last else rows, option=_DUMPS_OPTS)


def _bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _read_json(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _INVALID_JSON


async def start_sim(sim: Simulator, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Starts the sim on host:port (0 = free port) in the running loop; returns the runner and base URL
    'http://h:p/v1'. The caller owns the runner and must `await runner.cleanup()`."""
    runner = web.AppRunner(sim.app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{url_host}:{bound_port}/v1"


def run_sim(host: str, port: int, config: SimConfig | None = None) -> None:
    """Blocking: serves the sim until interrupted (used by the `embedding-gateway sim` command)."""
    web.run_app(Simulator(config).app(), host=host, port=port)
