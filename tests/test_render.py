"""Response rendering: the spliced body is byte for byte what orjson makes of the upstream's dict shape (the
simulator renders that way), for every output format, 1-D and 2-D vectors and any model name."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.render import embeddings_body, fragment, render_embeddings, vector_json

finite_f32 = hnp.from_dtype(np.dtype("<f4"), allow_nan=False, allow_infinity=False)
shapes = st.integers(1, 64) | st.tuples(st.integers(1, 4), st.integers(1, 16))
arrays = hnp.arrays(np.dtype("<f4"), shapes, elements=finite_f32)
outputs = st.sampled_from(["float", "base64", "binary", "ubinary"])


def dict_rendering(model: str, vectors: list[np.ndarray], tokens: int, output: str) -> bytes:
    """The reference: one dict per vector, one orjson call (the simulator's way)."""
    body: dict[str, Any] = {
        "model": model,
        "object": "list",
        "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
        "data": [{"object": "embedding", "index": i, "embedding": vector_json(v, output)}
                 for i, v in enumerate(vectors)],
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.text(max_size=20), vecs=st.lists(arrays, min_size=1, max_size=5),
       tokens=st.integers(0, 10**9), output=outputs)
def test_spliced_body_is_the_dict_rendering(model: str, vecs: list[np.ndarray], tokens: int, output: str) -> None:
    assert render_embeddings(model, vecs, tokens, output) == dict_rendering(model, vecs, tokens, output)


def test_fragments_render_views_and_big_endian_arrays_like_contiguous_little_endian() -> None:
    base = np.random.default_rng(3).standard_normal(64).astype("<f4")
    for vec in (base[::2], base.astype(">f4"), base[10:42]):
        for output in ("float", "base64", "binary", "ubinary"):
            contiguous = np.ascontiguousarray(vec, dtype="<f4")
            assert fragment(vec, output) == fragment(contiguous, output)
    empty = b'{"model":"m","object":"list","usage":{"total_tokens":3,"prompt_tokens":3},"data":[]}'
    assert embeddings_body("m", 3, []) == empty
