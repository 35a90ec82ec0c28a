"""Properties, fuzzed with Hypothesis: renderings read back exactly, token splits add up, cache keys are
equal exactly when requests are, the entry codec round-trips any bits and never crashes on garbage, and
request parsing refuses anything malformed with a 4xx error, never an exception of another kind."""

from __future__ import annotations

import base64
import contextlib
import functools
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import requests
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from hypothesis.extra import numpy as hnp

from gateway.cache import EmbeddingCache, item_keys, key_prefix, unit_key
from gateway.codec import decode, encode, encode_unit
from gateway.errors import GatewayError
from gateway.protocol import RENDER_FIELDS, parse_embedding_request, parse_json_object
from gateway.render import render_embeddings
from gateway.sim import MIN_DIMENSIONS, NATIVE_DIMS, TASKS
from gateway.store import open_cache_store
from gateway.tokens import split
from gateway.upstream import decode_answer

from .redis_server import RedisServer

FUZZ = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])

finite_f32 = hnp.from_dtype(np.dtype("<f4"), allow_nan=False, allow_infinity=False)
vectors = hnp.arrays(np.dtype("<f4"), st.integers(1, 300), elements=finite_f32)
multivectors = hnp.arrays(np.dtype("<f4"), st.tuples(st.integers(1, 6), st.integers(1, 40)), elements=finite_f32)
# Any 32-bit pattern, NaNs and infinities included: the codec stores bits, not numbers.
any_bits = hnp.arrays(np.dtype("<u4"), st.integers(1, 300)).map(lambda a: a.view("<f4"))
texts = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)


def json_of(floats: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | floats | texts
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8
    )


json_values = json_of(st.floats(allow_nan=False))
finite_json_values = json_of(st.floats(allow_nan=False, allow_infinity=False))  # what a JSON encoder will send


def read_rendered(embedding: Any, output: str, dim: int) -> np.ndarray:
    """What a client does with one rendered embedding (1-D)."""
    if output == "float":
        return np.asarray(embedding, dtype=np.float32)
    if output == "base64":
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    raw = np.asarray(embedding, dtype=np.int16)
    packed = (raw + 128).astype(np.uint8) if output == "binary" else raw.astype(np.uint8)
    return np.unpackbits(packed)[:dim]


# ---- rendering ---------------------------------------------------------------------------------------------


@FUZZ
@given(vecs=st.lists(vectors, min_size=1, max_size=4), output=st.sampled_from(["float", "base64", "binary", "ubinary"]))
def test_rendered_vectors_read_back_exactly(vecs: list[np.ndarray], output: str) -> None:
    body = orjson.loads(render_embeddings("m", vecs, 7, output))
    assert [d["index"] for d in body["data"]] == list(range(len(vecs)))
    assert body["usage"] == {"total_tokens": 7, "prompt_tokens": 7}
    for vec, d in zip(vecs, body["data"], strict=True):
        got = read_rendered(d["embedding"], output, vec.size)
        if output in ("float", "base64"):
            assert got.tobytes() == vec.tobytes()  # bit-exact, -0.0 and subnormals included
        else:
            assert np.array_equal(got.astype(bool), vec > 0)
            assert len(d["embedding"]) == (vec.size + 7) // 8


@FUZZ
@given(mv=multivectors, output=st.sampled_from(["float", "base64"]))
def test_rendered_multivectors_read_back_exactly(mv: np.ndarray, output: str) -> None:
    (d,) = orjson.loads(render_embeddings("m", [mv], 1, output))["data"]
    rows = [read_rendered(row, output, mv.shape[1]) for row in d["embedding"]]
    assert np.stack(rows).tobytes() == mv.tobytes()


@FUZZ
@given(
    vecs=st.lists(vectors, min_size=1, max_size=4),
    tokens=st.integers(0, 2**40),
    output=st.sampled_from(["float", "base64"]),
)
def test_upstream_answers_decode_to_what_was_rendered(vecs: list[np.ndarray], tokens: int, output: str) -> None:
    """The gateway's decoding of an upstream answer inverts the rendering, in both formats it may get."""
    result = decode_answer(render_embeddings("m", vecs, tokens, output), len(vecs))
    assert result.tokens == tokens
    assert [v.tobytes() for v in result.vectors] == [v.tobytes() for v in vecs]


@FUZZ
@given(count=st.integers(1, 5), data=st.data())
def test_upstream_answers_with_wrong_counts_or_junk_are_refused(count: int, data: st.DataObject) -> None:
    from gateway.upstream import BadAnswer

    junk = data.draw(json_values | st.binary(max_size=50).map(lambda b: b.decode("latin-1")))
    raw = orjson.dumps({"data": junk, "usage": {"total_tokens": 1}}) if data.draw(st.booleans()) else orjson.dumps(junk)
    with pytest.raises(BadAnswer):
        decode_answer(raw, count)


# ---- tokens ------------------------------------------------------------------------------------------------


@FUZZ
@given(total=st.integers(0, 10**12), weights=st.lists(st.integers(0, 10**6), min_size=1, max_size=300))
def test_token_split_sums_to_the_batch_usage(total: int, weights: list[int]) -> None:
    parts = split(total, weights)
    assert sum(parts) == total
    assert len(parts) == len(weights) and all(p >= 0 for p in parts)
    wsum = sum(weights) or len(weights)
    even = weights if sum(weights) else [1] * len(weights)
    for part, w in zip(parts, even, strict=True):
        exact = total * w / wsum
        assert exact - 1 < part < exact + 1  # largest remainder: each part is its quota rounded one way


# ---- keys --------------------------------------------------------------------------------------------------

params = st.fixed_dictionaries(
    {"model": texts},
    optional={
        "task": texts,
        "dimensions": st.integers(1, 4096),
        "normalized": st.booleans(),
        "truncate": st.booleans(),
        "late_chunking": st.booleans(),
        "return_multivector": st.booleans(),
        "x_vendor_option": finite_json_values,  # what a request can carry: JSON has no infinity
        "prompt_name": texts,
    },
)
objects = st.dictionaries(st.sampled_from(["text", "image", "pdf"]), texts, min_size=1)
inputs = st.lists(texts | objects, min_size=1, max_size=6)


def keys_of(body: dict[str, Any], team: str | None = None) -> list[bytes]:
    req = parse_embedding_request(body, max_inputs=100)
    prefix = key_prefix(req, team)
    return [unit_key(prefix, req.items)] if req.unit else item_keys(prefix, req.items)


@FUZZ
@given(p=params, items=inputs, data=st.data())
def test_equal_requests_have_equal_keys(p: dict[str, Any], items: list[Any], data: st.DataObject) -> None:
    body = {**p, "input": items}
    shuffled = dict(data.draw(st.permutations(list(body.items()))))
    rendered = {**shuffled, "encoding_format": data.draw(st.sampled_from(["float", "base64"])), "user": "u"}
    assert keys_of(body) == keys_of(shuffled) == keys_of(rendered)
    # The same dict, re-parsed from JSON text in another key order, is the same request.
    assert keys_of(parse_json_object(orjson.dumps(shuffled))) == keys_of(body)
    if len(items) == 1 and isinstance(items[0], str):
        assert keys_of({**p, "input": items[0]}) == keys_of(body)


@FUZZ
@given(p=params, items=inputs, data=st.data())
def test_any_differing_field_changes_the_keys(p: dict[str, Any], items: list[Any], data: st.DataObject) -> None:
    body = {**p, "input": items}
    name = data.draw(st.sampled_from([*p, "another_field"]))
    other = dict(p)
    new = data.draw(finite_json_values if name not in ("model", "task", "prompt_name") else texts)
    if name in ("normalized", "truncate", "late_chunking", "return_multivector"):
        new = not p[name]
    elif name == "dimensions":
        new = p[name] + 1
    assume(other.get(name, "<absent>") != new or type(other.get(name)) is not type(new))
    other[name] = new
    assume(name not in RENDER_FIELDS)
    mine, theirs = keys_of(body), keys_of({**other, "input": items})
    assert not set(mine) & set(theirs)


@FUZZ
@given(p=params, items=inputs, data=st.data())
def test_a_different_input_or_team_changes_the_key(p: dict[str, Any], items: list[Any], data: st.DataObject) -> None:
    p = {**p, "late_chunking": False, "return_multivector": False}
    body = {**p, "input": items}
    changed = data.draw(texts)
    assume(changed not in items)
    i = data.draw(st.integers(0, len(items) - 1))
    other = [*items[:i], changed, *items[i + 1 :]]
    mine, theirs = keys_of(body), keys_of({**p, "input": other})
    assert mine[i] != theirs[i]
    assert keys_of(body, "team-a") != keys_of(body, "team-b") != keys_of(body, None)
    assert not set(keys_of(body, "team-a")) & set(keys_of(body, None))


@FUZZ
@given(p=params, items=st.lists(texts, min_size=2, max_size=5, unique=True), data=st.data())
def test_unit_keys_depend_on_order_and_boundaries(p: dict[str, Any], items: list[str], data: st.DataObject) -> None:
    body = {**p, "late_chunking": True, "input": items}
    perm = data.draw(st.permutations(items))
    assume(perm != items)
    assert keys_of(body) != keys_of({**body, "input": perm})
    joined = [items[0] + items[1], *items[2:]]  # same characters, one boundary fewer
    assert keys_of(body) != keys_of({**body, "input": joined})


# ---- the cache codec ---------------------------------------------------------------------------------------


@FUZZ
@given(vec=any_bits | multivectors, tokens=st.integers(0, 2**32 - 1))
def test_codec_round_trips_any_bits(vec: np.ndarray, tokens: int) -> None:
    entry = decode(encode(vec, tokens))
    assert entry.tokens == tokens
    assert isinstance(entry.vectors, np.ndarray)
    assert entry.vectors.shape == vec.shape and entry.vectors.tobytes() == vec.tobytes()


@FUZZ
@given(parts=st.lists(vectors | multivectors, min_size=1, max_size=5), tokens=st.integers(0, 2**32 - 1))
def test_codec_round_trips_units(parts: list[np.ndarray], tokens: int) -> None:
    entry = decode(encode_unit(parts, tokens))
    assert entry.tokens == tokens and isinstance(entry.vectors, list)
    assert [(v.shape, v.tobytes()) for v in entry.vectors] == [(p.shape, p.tobytes()) for p in parts]


@st.composite
def corrupted_entries(draw: st.DrawFn) -> bytes:
    """A real entry cut short, or with one byte flipped."""
    raw = encode(draw(vectors | multivectors | any_bits), 1)
    cut = draw(st.integers(0, len(raw) - 1))
    if draw(st.booleans()):
        return raw[:cut] + bytes([raw[cut] ^ draw(st.integers(1, 255))]) + raw[cut + 1 :]
    return raw[:cut]


@FUZZ
@given(raw=st.binary(max_size=200) | corrupted_entries())
@example(raw=encode(np.zeros(0, dtype="<f4"), 1))  # a bare header: no vector at all
@example(raw=b"\x01\x02\x01\x00" + bytes(8))  # a unit of one 0-dim vector
async def test_cache_survives_garbage_entries(redis_server: RedisServer, raw: bytes) -> None:
    """A corrupt entry in the store (the suite's real Redis) is a miss (or a well-formed entry), never an exception."""
    store = open_cache_store(redis_server.url, max_bytes=1 << 20)
    try:
        await store.set_many([(b"k", raw)], 60)
        (held,) = await EmbeddingCache(store, ttl_s=60, local_max_bytes=1 << 20).get_many([b"k"])
    finally:
        await store.close()
    if held is not None:
        vecs = held.entry.vectors if isinstance(held.entry.vectors, list) else [held.entry.vectors]
        assert all(v.dtype == np.dtype("<f4") and v.size > 0 for v in vecs)


# ---- request parsing ---------------------------------------------------------------------------------------


@FUZZ
@given(body=st.dictionaries(st.sampled_from(["model", "input", "task", "dimensions", "normalized",
                                             "embedding_type", "encoding_format", "user", "late_chunking"])
                            | texts, json_values, max_size=6))
def test_parsing_refuses_garbage_with_a_client_error_only(body: dict[str, Any]) -> None:
    try:
        req = parse_embedding_request(body, max_inputs=4)
    except GatewayError as exc:
        assert 400 <= exc.status < 500
        assert exc.body()["detail"] and exc.body()["code"]
        return
    assert req.items and len(req.items) <= 4 and isinstance(req.model, str) and req.model


@FUZZ
@given(raw=st.binary(max_size=100) | json_values.map(orjson.dumps))
def test_body_parsing_refuses_non_objects_with_400(raw: bytes) -> None:
    try:
        body = parse_json_object(raw)
    except GatewayError as exc:
        assert exc.status == 400 and exc.code == "INVALID_JSON"
        return
    assert isinstance(body, dict)


# ---- schemathesis against the served /openapi.json -------------------------------------------------------


@pytest.fixture(scope="module")
def served_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `embedding-gateway serve` process (sim upstream, memory stores) on a free loopback port."""
    from .conftest import base_config
    from .redis_server import free_port

    port = free_port()
    config = base_config(listen={"host": "127.0.0.1", "port": port}, log_level="WARNING")
    path = tmp_path_factory.mktemp("schemathesis") / "gateway.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    log = path.with_suffix(".log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        cwd=Path(__file__).resolve().parent.parent, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        assert proc.poll() is None, "the gateway exited at start"
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.05)  # a process starting: nothing to wait on but its port
    raise AssertionError(f"{url} never answered")


# Cases per operation and generation mode; the embeddings routes, where the parsing is, get the most.
SCHEMATHESIS_CASES = {"/v1/embeddings": 250, "/embeddings": 120, "/v1/usage": 150}
SCHEMATHESIS_DEFAULT_CASES = 30
# The schema's positive bodies are mostly refused (an empty or unknown model is a 422): these are bodies the
# upstream accepts, so the success path (status, headers, body shape) is fuzzed too.
REALISTIC_CASES = 150
realistic_bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["jina-embeddings-v3", "jina-embeddings-v4", "jina-embeddings-v5-text-nano"]),
        "input": texts | st.lists(texts | st.builds(lambda t: {"text": t}, texts), min_size=1, max_size=6),
    },
    optional={
        "task": st.sampled_from(["retrieval.query", "retrieval.passage", "text-matching", "classification"]),
        "dimensions": st.integers(32, 768),
        "normalized": st.booleans(),
        "late_chunking": st.booleans(),
        "embedding_type": st.sampled_from(["float", "base64", "binary", "ubinary"]),
        "encoding_format": st.sampled_from(["float", "base64"]),
        "user": texts,
        "x_unknown_option": finite_json_values,
    },
)


def _key_for(operation: Any) -> str:
    from .conftest import ADMIN_KEY, TEAM_A_KEY

    schemes = {name for requirement in operation.definition.raw.get("security", [{"TeamKey": []}])
               for name in requirement}
    if "TeamKey" in schemes or not schemes:
        return TEAM_A_KEY
    if "MetricsToken" in schemes:
        return "metrics-token"
    return ADMIN_KEY


@pytest.mark.slow
def test_schemathesis_no_5xx_and_every_answer_as_documented(served_gateway: str) -> None:
    """Positive and negative cases for every operation of the served document, with every check schemathesis has
    on (its default): no 5xx, every status, content type, header and body as documented (errors included:
    `{"detail", "code"}`), valid data accepted, invalid data refused, Allow headers, auth not ignored; at least
    1,000 cases."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.config import SchemathesisConfig

    from .conftest import TEAM_A_KEY
    from .reliability import Answer, record

    doc = requests.get(served_gateway + "/openapi.json", headers={"Authorization": f"Bearer {TEAM_A_KEY}"}).json()
    # Which models, tasks and sizes exist is the upstream's to say (the gateway passes its 422 on): the served
    # document cannot list them, so "valid" here means what the simulator serves, for models of one native size.
    # (A batch job takes any model name: its lines fail one by one if the upstream refuses it.)
    fields = doc["components"]["schemas"]["EmbeddingRequest"]["properties"]
    fields["model"]["enum"] = [m for m, dims in NATIVE_DIMS.items() if dims == 1024]
    fields["task"]["enum"] = [*TASKS, None]
    fields["dimensions"].update(minimum=MIN_DIMENSIONS, maximum=1024)
    # `encoding_type` is `embedding_type`'s alias and must agree with it, which a schema cannot say: bodies use one.
    del fields["encoding_type"]
    # /v1/usage's range rules (start <= end, at most usage.max_query_days) tie two parameters together, and the
    # audit log's `since` must be a real ISO 8601 time, which a schema cannot say: a 422 there is the documented
    # answer to schema-valid data.
    accepted = {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "422"]}}
    # A negative /v1/usage case can be "invalid" only through a parameter requests drops (a None value) and the
    # Authorization header this harness always sends: the gateway cannot refuse what never reached it.
    usage = {**accepted, "negative_data_rejection": {"enabled": False}}
    config = SchemathesisConfig.from_dict({"operations": [{"include-path": "/v1/usage", "checks": usage},
                                                          {"include-path": "/admin/audit", "checks": accepted}]})
    schema = schemathesis.openapi.from_dict(doc, config=config)
    session = requests.Session()
    answers: list[Answer] = []
    failures: list[str] = []

    def caller(headers: dict[str, str]) -> Any:
        def call(case: Any) -> None:
            response = case.call(base_url=served_gateway, session=session, headers=headers, timeout=10)
            answers.append(Answer(response.status_code, dict(response.headers), response.content))
            case.validate_response(response, headers=headers)  # every check schemathesis has

        return call

    for result in schema.get_all_operations():
        operation = result.ok()
        headers = {"Authorization": f"Bearer {_key_for(operation)}"}
        cases = SCHEMATHESIS_CASES.get(operation.path, SCHEMATHESIS_DEFAULT_CASES)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = settings(max_examples=cases, deadline=None, database=None, derandomize=True,
                           suppress_health_check=list(HealthCheck))(
                given(case=operation.as_strategy(mode))(caller(headers)))
            try:
                run()
            except Unsatisfiable:  # no parameter or body to break: nothing negative to send
                assert mode is GenerationMode.NEGATIVE
            except (Exception, BaseExceptionGroup) as exc:  # every operation's failure, not only the first
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
        if operation.method.upper() == "POST" and operation.path.endswith("/embeddings"):
            make = functools.partial(schema.make_case, operation=operation, media_type="application/json")
            run = settings(max_examples=REALISTIC_CASES, deadline=None, database=None, derandomize=True,
                           suppress_health_check=list(HealthCheck))(
                given(case=realistic_bodies.map(lambda body, make=make: make(body=body)))(caller(headers)))
            try:
                run()
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.method.upper()} {operation.path} (realistic): {exc}")
    tally = record("schemathesis against /openapi.json", answers)
    assert not failures, "\n\n".join(failures)
    assert tally.sent >= 1000
    assert not [a for a in answers if a.status >= 500]
    assert tally.ok >= REALISTIC_CASES  # the success path was reached, not only refusals
