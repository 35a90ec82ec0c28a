"""Response rendering: the spliced body is byte for byte what orjson makes of the upstream's dict shape (the
simulator renders that way), for every output format, 1-D and 2-D vectors and any model name."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.protocol import (
    render_body,
    render_embeddings,
    render_fragment,
    render_items,
    render_solo,
    render_vector,
)

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
        "data": [{"object": "embedding", "index": i, "embedding": render_vector(v, output)}
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
            assert render_fragment(vec, output) == render_fragment(contiguous, output)
    empty = b'{"model":"m","object":"list","usage":{"total_tokens":3,"prompt_tokens":3},"data":[]}'
    assert render_body("m", 3, []) == empty


def test_the_pieces_of_an_answer_join_to_the_answer() -> None:
    # render_embeddings is checked against orjson's rendering of the dict above; the hot tier's pieces
    # (render_solo's, render_items') must join to the same bytes.
    vecs = [np.arange(4, dtype="<f4") + i for i in range(3)]
    fragments = [render_fragment(v, "float") for v in vecs]
    assert b"".join(render_solo("m", 3, fragments[0])) == render_embeddings("m", vecs[:1], 3, "float")
    items = [render_solo("m", 1, f)[1] for f in fragments]
    assert b"".join(render_items("m", 9, items)) == render_embeddings("m", vecs, 9, "float")
