"""The stderr handler writes once per event-loop turn, keeps order, and never holds back a warning."""

from __future__ import annotations

import asyncio
import logging

from gateway import logbuffer
from gateway.logbuffer import LoopBufferedHandler


class Stream:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def make_logger(stream: Stream) -> logging.Logger:
    handler = LoopBufferedHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"test.logbuffer.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


async def test_lines_of_one_loop_turn_leave_in_one_write() -> None:
    stream = Stream()
    log = make_logger(stream)
    for i in range(100):
        log.info("line %d", i)
    assert stream.writes == []
    await asyncio.sleep(0)
    assert stream.writes == ["".join(f"line {i}\n" for i in range(100))]
    log.info("next turn")
    await asyncio.sleep(0)
    assert stream.writes[1:] == ["next turn\n"]


async def test_a_warning_is_written_at_once_after_what_was_buffered() -> None:
    stream = Stream()
    log = make_logger(stream)
    log.info("first")
    log.warning("second")
    assert stream.writes == ["first\nsecond\n"]
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert stream.writes == ["first\nsecond\n"]


def test_outside_a_loop_each_line_is_written_at_once() -> None:
    stream = Stream()
    log = make_logger(stream)
    log.info("start-up")
    log.info("again")
    assert stream.writes == ["start-up\n", "again\n"]


async def test_shutdown_flush_writes_what_is_pending() -> None:
    stream = Stream()
    log = make_logger(stream)
    log.info("last words")
    log.handlers[0].flush()
    assert stream.writes == ["last words\n"]


async def test_access_lines_of_a_serving_process_skip_logging_but_keep_its_level() -> None:
    stream = Stream()
    handler = LoopBufferedHandler(stream)  # type: ignore[arg-type]
    access = logging.getLogger("gateway.access")
    level = access.level
    logbuffer.install(handler)
    try:
        access.setLevel(logging.INFO)
        logbuffer.write_access('{"status":200}')
        logbuffer.write_access('{"status":429}')
        access.setLevel(logging.WARNING)  # log_level: WARNING turns the access log off
        logbuffer.write_access('{"status":500}')
        await asyncio.sleep(0)
        assert stream.writes == ['{"status":200}\n{"status":429}\n']
    finally:
        logbuffer.install(None)
        access.setLevel(level)
