"""The access log is `logging` records on `gateway.access`: a handler attached there (a log shipper) receives one
record per request, and a serving process writes each as one JSON line on stderr."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from typing import Any

import orjson
import pytest

from .conftest import AccessRecords, Gateway, auth


async def test_a_handler_on_gateway_access_receives_one_record_per_request(
    gateway: Gateway, access: AccessRecords
) -> None:
    client = await gateway()
    sent: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/embeddings", {"json": {"model": "jina-embeddings-v3", "input": ["a", "b"]}, "headers": auth()}),
        ("POST", "/v1/embeddings", {"json": {"model": "jina-embeddings-v3", "input": ["a"]}, "headers": auth()}),
        ("POST", "/v1/embeddings", {"json": {"input": ["a"]}, "headers": auth()}),  # 422
        ("GET", "/v1/usage", {"headers": {"Authorization": "Bearer wrong"}}),  # 401
        ("GET", "/nowhere", {"headers": auth()}),  # 404
        ("GET", "/metrics", {"headers": {"Authorization": "Bearer metrics-token"}}),
        ("GET", "/healthz", {}),  # a probe: not logged
    ]
    statuses = []
    for method, path, kwargs in sent:
        async with client.request(method, path, **kwargs) as resp:
            await resp.read()
            statuses.append((resp.status, resp.headers["X-Request-Id"]))
    lines = [orjson.loads(r.getMessage()) for r in access.records]
    assert [(line["status"], line["request_id"]) for line in lines] == statuses[:-1]
    assert [line["path"] for line in lines] == ["/v1/embeddings", "/v1/embeddings", "/v1/embeddings", "/v1/usage",
                                                "unmatched", "/metrics"]
    assert lines[0]["team"] == "team-a" and lines[0]["inputs"] == 2 and lines[0]["misses"] == 2
    assert lines[1]["hits"] == 1
    # The same fields, structured, for a handler that ships them as they are.
    assert [r.access for r in access.records] == lines  # type: ignore[attr-defined]
    assert all(r.levelno == logging.INFO for r in access.records)


async def test_access_records_carry_their_own_time_and_come_from_an_installed_record_factory(
    gateway: Gateway, access: AccessRecords
) -> None:
    """Records copied from a prototype still say when they were made; a program's own record factory (OpenTelemetry
    installs one to add trace ids) makes the access records too."""
    client = await gateway()
    before = time.time()
    async with client.get("/v1/usage", headers=auth()) as resp:
        assert resp.status == 200
    after = time.time()
    (plain,) = access.records
    assert before <= plain.created <= after and plain.name == "gateway.access"
    made_by_logging = logging.LogRecord("x", logging.INFO, "", 0, "", (), None)
    assert plain.relativeCreated - made_by_logging.relativeCreated == pytest.approx(
        (plain.created - made_by_logging.created) * 1000, abs=1e-3)
    default = logging.getLogRecordFactory()

    def traced(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = default(*args, **kwargs)
        record.trace_id = "t-1"
        return record

    logging.setLogRecordFactory(traced)
    try:
        async with client.get("/v1/usage", headers=auth()) as resp:
            assert resp.status == 200
    finally:
        logging.setLogRecordFactory(default)
    traced_record = access.records[1]
    assert traced_record.trace_id == "t-1"  # type: ignore[attr-defined]
    assert orjson.loads(traced_record.getMessage())["path"] == "/v1/usage"
    assert plain.access["path"] == "/v1/usage" and not hasattr(plain, "trace_id")  # type: ignore[attr-defined]


async def test_at_warning_level_no_access_record_is_made(gateway: Gateway, access: AccessRecords) -> None:
    client = await gateway()
    logging.getLogger("gateway.access").setLevel(logging.WARNING)  # what `log_level: WARNING` does to it
    async with client.get("/v1/usage", headers=auth()) as resp:
        assert resp.status == 200
    assert access.records == []


def test_a_serving_process_writes_each_access_record_as_one_json_line_on_stderr() -> None:
    """setup_logging's buffered handler: every record reaches stderr, in order, before the process ends (records
    logged inside an event loop are written at the end of their turn)."""
    program = """
import asyncio
import logging
from gateway.server import setup_logging
setup_logging("INFO")
access = logging.getLogger("gateway.access")
for i in range(250):
    access.info('{"n":%d}' % i)
async def turn():
    for i in range(250, 500):
        access.info('{"n":%d}' % i)
asyncio.run(turn())
logging.getLogger("gateway").warning("last")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    assert done.stderr.splitlines() == [f'{{"n":{i}}}' for i in range(500)] + ["last"]


def test_a_serving_process_writes_an_error_with_its_traceback_and_args_formatted() -> None:
    """The stderr format is the message alone; a logged exception adds its traceback below it."""
    program = """
import logging
from gateway.server import setup_logging
setup_logging("INFO")
log = logging.getLogger("gateway")
log.warning("upstream %s failed %d times", "jina", 3)
try:
    raise ValueError("boom")
except ValueError:
    log.exception("handler failed")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    lines = done.stderr.splitlines()
    assert lines[:3] == ["upstream jina failed 3 times", "handler failed", "Traceback (most recent call last):"]
    assert lines[-1] == "ValueError: boom"
