"""A stderr log handler that writes once per event-loop turn instead of once per line.

The access log writes a line per request, and one `write()` system call per line cost ~80 µs of a ~350 µs
all-hit request on our (nested-virtualisation) bench machine: more than everything else the gateway adds.
Lines logged inside the event loop are joined and written by one callback at the end of the loop's current
turn, so a burst of requests answered together costs one system call. Anything logged outside a running loop
(start-up, shutdown, other threads) and anything at WARNING or above is written at once, with what is buffered
before it, so order is kept and an error is never held back. What a `kill -9` can lose is the lines of the
last loop turn (a few milliseconds): the same trade nginx's `access_log ... buffer=` makes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TextIO

_ACCESS = logging.getLogger("gateway.access")
_stderr: LoopBufferedHandler | None = None  # the serving process's handler, once setup_logging installed it


def install(handler: LoopBufferedHandler | None) -> None:
    global _stderr
    _stderr = handler


def write_access(line: str) -> None:
    """One access log line (JSON), at INFO on the `gateway.access` logger.

    A serving process appends it to its stderr buffer directly: a LogRecord and the logging module's handler
    chain cost ~10 µs per line, for a line that is only ever printed as it is. Elsewhere (tests, embedding
    the app) it goes through `logging`, so handlers and caplog see it as before.
    """
    if not _ACCESS.isEnabledFor(logging.INFO):
        return
    if _stderr is not None:
        _stderr.write_line(line)
    else:
        _ACCESS.info(line)


class LoopBufferedHandler(logging.StreamHandler[TextIO]):
    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream or sys.stderr)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        # emit() runs under the handler's lock (Handler.handle), so the buffer is only touched under it.
        self._pending.append(line)
        if record.levelno >= logging.WARNING:
            self._write()
            return
        self._schedule()

    def write_line(self, line: str) -> None:
        """A preformatted line (no newline), buffered like an INFO record."""
        with self.lock:  # type: ignore[union-attr]  # StreamHandler always has one; `with` skips acquire()'s frame
            self._pending.append(line + self.terminator)
            if not self._scheduled:
                self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread: nothing would flush later
                self._write()
                return
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            self._write()
        finally:
            self.release()

    def _write(self) -> None:
        if not self._pending:
            return
        text, self._pending = "".join(self._pending), []
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # a closed or full stderr must not fail a request
            pass

