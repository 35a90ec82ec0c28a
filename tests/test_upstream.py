"""Decoding of the upstream's answer (the retries, timeouts and faults around it are in test_faults.py)."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from gateway.upstream import BadAnswer, decode_answer

GOOD = base64.b64encode(np.arange(4, dtype="<f4").tobytes()).decode()


def answer(embedding: object) -> bytes:
    return orjson.dumps({"data": [{"index": 0, "embedding": embedding}], "usage": {"total_tokens": 3}})


def test_base64_and_float_embeddings_decode() -> None:
    for embedding in (GOOD, [GOOD, GOOD], [0.0, 1.0, 2.0, 3.0]):
        result = decode_answer(answer(embedding), 1)
        assert result.tokens == 3 and result.vectors[0].reshape(-1)[:4].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("embedding", [
    GOOD[:-1] + "*",  # outside the alphabet
    "AAAA" + GOOD,  # not a whole number of float32s once decoded
    GOOD + "AAAA",  # data after the padding
    "=" + GOOD,  # padding first
    GOOD[:5],  # cut short
    "",
])
def test_malformed_base64_is_a_bad_answer(embedding: str) -> None:
    with pytest.raises(BadAnswer):
        decode_answer(answer(embedding), 1)


def b64(values: list[float]) -> str:
    return base64.b64encode(np.array(values, dtype="<f4").tobytes()).decode()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, -np.nan])
def test_a_non_finite_base64_value_is_a_bad_answer(bad: float) -> None:
    for position in (0, 3):
        values = [0.5, -1.0, 2.0, 3.0]
        values[position] = bad
        with pytest.raises(BadAnswer):
            decode_answer(answer(b64(values)), 1)


def test_finite_values_near_the_float32_limits_decode() -> None:
    # Top bytes 0x7f / 0xff without an all-ones exponent: finite, so they decode (the byte pre-check only
    # sends them to numpy's isfinite).
    values = [3.0e38, -3.0e38, 1.7e38, float(np.finfo(np.float32).max), 1e-45, -0.0]
    result = decode_answer(answer(b64(values)), 1)
    assert result.vectors[0].tolist() == np.array(values, dtype="<f4").tolist()
