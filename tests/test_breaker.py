"""The state store's breaker shared by quota and pacing: back off after a failure, log an outage twice."""

from __future__ import annotations

import logging

import pytest

from gateway.breaker import StoreBreaker
from gateway.metrics import Metrics


def test_a_failure_backs_off_counts_each_error_and_logs_the_outage_once_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    backoff = [2.0]
    metrics = Metrics()
    breaker = StoreBreaker(metrics, logging.getLogger("gateway.test"), down=lambda: "doing without",
                           back="shared again", backoff_s=lambda: backoff[0], monotonic=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="gateway.test")
    assert breaker.available()
    breaker.failed(ConnectionError("refused"), "quota")
    assert not breaker.available() and breaker.down
    now[0] += 1.999
    assert not breaker.available()
    now[0] += 0.001
    assert breaker.available()
    backoff[0] = 5.0  # a reload: the next failure backs off longer
    breaker.failed(ConnectionError("refused"), "quota")
    now[0] += 4.9
    assert not breaker.available()
    breaker.ok()
    breaker.ok()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["state store unreachable (ConnectionError: refused); doing without",
                     "state store reachable again; shared again"]
    assert metrics.store_errors.labels("state", "quota")._value.get() == 2
