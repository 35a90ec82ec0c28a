"""Running the gateway: one process that drains on SIGTERM/SIGINT and reloads its config on SIGHUP, or a supervisor
of N such worker processes sharing one port (SO_REUSEPORT), with their metrics summed through prometheus-client's
multiprocess files.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection as mpc
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from . import appkeys as K
from . import config as cfg
from .connections import ConnectionGuard

log = logging.getLogger("gateway")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Once the drain's own wait is over, how long aiohttp lets the remaining handlers run before cancelling them.
_CANCEL_GRACE_S = 1.0


def run(config: cfg.Config, config_path: str | None, *, host: str, port: int, workers: int = 1) -> int:
    """Serves until SIGTERM/SIGINT; returns the exit code (0 = every in-flight request was finished)."""
    if workers <= 1:
        def announce() -> None:
            print(f"embedding-gateway listening on http://{host}:{port}", flush=True)

        return run_loop(serve(config, config_path, host=host, port=port, reuse_port=False, on_ready=announce))
    if port == 0:
        raise ValueError("--workers needs a fixed port (the workers share it)")
    return Supervisor(config, config_path, host=host, port=port, workers=workers).run()


def run_loop(main: Any) -> int:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        result: int = asyncio.run(main)
        return result
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code: int = runner.run(main)
        return code


async def serve(
    config: cfg.Config,
    config_path: str | Path | None,
    *,
    host: str,
    port: int,
    reuse_port: bool,
    on_ready: Callable[[], None],
) -> int:
    from .app import create_app  # the app pulls in every part; the supervisor process needs none of them

    app = create_app(config, config_path=config_path)
    live = app[K.LIVE]
    live.on_change(lambda c: logging.getLogger().setLevel(c.log_level))
    runner, listener = await start(app, host, port, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Synchronous on the loop: no request runs while the config is swapped, so none sees half of two.
    loop.add_signal_handler(signal.SIGHUP, live.reload)
    try:
        on_ready()
        await stop.wait()
    except BaseException:
        listener.close()
        await runner.cleanup()
        raise
    return await drain(runner, app, listener)


async def start(
    app: web.Application, host: str, port: int, *, reuse_port: bool = False
) -> tuple[web.AppRunner, asyncio.Server]:
    """Sets the app up and listens on host:port with the connection limits of `limits` (idle keep-alive
    connections through aiohttp's keepalive_timeout; the header deadline and the connection bound through
    gateway/connections.py, since aiohttp has neither). The caller stops both: `drain()`."""
    limits = app[K.LIVE].config.limits
    guard = app[K.CONNECTIONS] = ConnectionGuard(
        header_timeout_s=limits.header_timeout_s, max_connections=limits.max_connections
    )
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=_CANCEL_GRACE_S,
                           keepalive_timeout=limits.keepalive_timeout_s)
    await runner.setup()
    assert runner.server is not None
    try:
        listener = await asyncio.get_running_loop().create_server(
            guard.protocol_factory(runner.server), host, port, reuse_port=reuse_port or None,
        )
    except BaseException:
        await runner.cleanup()
        raise
    return runner, listener


async def drain(runner: web.AppRunner, app: web.Application, listener: asyncio.Server) -> int:
    """Stops accepting, lets in-flight requests and pending cache writes finish, releases what others may take.

    Returns 0 when every request finished within `shutdown_timeout_s`, 1 when some had to be cut short.
    """
    loop = asyncio.get_running_loop()
    timeout = app[K.LIVE].config.shutdown_timeout_s
    deadline = loop.time() + timeout
    listener.close()  # the listening socket closes: new connections go to other workers or replicas
    active = app[K.METRICS].active
    log.info("draining: %d requests in flight, up to %.0fs", active.count, timeout)
    worker = app.get(K.BATCH_WORKER)
    if worker is not None:
        # First, not after the requests: another replica resumes these jobs from their checkpoints at once.
        await worker.stop(timeout_s=timeout)
        log.info("drain: batch jobs stopped, their leases released")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(active.idle(), timeout)
    cut = active.count
    if cut:
        log.error("drain: %d requests still running after %.0fs; cancelling them", cut, timeout)
    # cleanup(): closes idle keep-alive connections, runs on_shutdown, cancels what is left (after
    # the runner's short shutdown_timeout), then the cleanup contexts: the coalescer lets in-flight upstream calls
    # and their cache writes finish, the usage tally is written.
    try:
        await asyncio.wait_for(runner.cleanup(), max(0.0, deadline - loop.time()) + _CANCEL_GRACE_S + 1.0)
    except TimeoutError:
        log.error("drain: cleanup not finished within %.0fs; exiting anyway", timeout)
        return 1
    if not cut:
        log.info("drained in %.2fs", timeout - (deadline - loop.time()))
    return 1 if cut else 0


# ---- N workers ---------------------------------------------------------------------------------------------


class Supervisor:
    """Starts N workers on one port, forwards signals, restarts a worker that dies, and cleans up its metrics."""

    def __init__(self, config: cfg.Config, config_path: str | None, *, host: str, port: int, workers: int) -> None:
        self.config = config
        self.config_path = config_path
        self.host, self.port, self.size = host, port, workers
        self.ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no loop or pool state is copied
        self.procs: dict[int, Any] = {}  # sentinel fd → process
        self.stopping = False
        self.exit_codes: list[int] = []
        self.restarts: list[float] = []

    def run(self) -> int:
        owned = MULTIPROC_ENV not in os.environ
        path = tempfile.mkdtemp(prefix="eg-metrics-") if owned else os.environ[MULTIPROC_ENV]
        _clear(path)
        os.environ[MULTIPROC_ENV] = path  # before the workers start: they import prometheus_client fresh
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        pending: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: pending.append(signum))
        self.ready_r, self.ready_w = self.ctx.Pipe(duplex=False)
        try:
            return self._loop(wake_r, pending)
        finally:
            signal.set_wakeup_fd(-1)
            wake_r.close()
            wake_w.close()
            if owned:
                shutil.rmtree(path, ignore_errors=True)

    def _loop(self, wake: socket.socket, pending: list[int]) -> int:
        for index in range(self.size):
            self._start(index)
        ready: set[int] = set()
        while self.procs:
            for obj in mpc.wait([wake, self.ready_r, *self.procs]):
                if obj is wake:
                    wake.recv(64)
                elif obj is self.ready_r:
                    ready.add(self.ready_r.recv())
                    if len(ready) == self.size:
                        pids = " ".join(str(p.pid) for p in self.procs.values())
                        print(f"embedding-gateway listening on http://{self.host}:{self.port} "
                              f"({self.size} workers, pids {pids})", flush=True)
                else:
                    self._reap(obj)
            while pending:
                self._signal(pending.pop(0))
            if self.stopping:
                return self._wait_all()
        return 0 if all(c == 0 for c in self.exit_codes) else 1

    def _start(self, index: int) -> None:
        proc = self.ctx.Process(
            target=_worker_main, name=f"gateway-worker-{index}", daemon=False,
            args=(self.config, self.config_path, self.host, self.port, self.ready_w, index),
        )
        proc.start()
        proc.index = index  # type: ignore[attr-defined]
        self.procs[proc.sentinel] = proc

    def _reap(self, sentinel: Any) -> None:
        from prometheus_client import multiprocess

        proc = self.procs.pop(sentinel)
        proc.join()
        # Drops its live gauges; its counters stay in the totals (the work it did was done).
        multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
        if self.stopping:  # the exit code says whether the drain finished every request
            self.exit_codes.append(proc.exitcode)
            return
        log.error("worker %d (pid %d) exited with %s; starting a new one", proc.index, proc.pid, proc.exitcode)
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 60] + [now]
        if len(self.restarts) > 3 * self.size:
            log.error("workers keep dying (%d restarts in a minute); stopping", len(self.restarts))
            self._signal(signal.SIGTERM)
            self.exit_codes.append(1)
            return
        self._start(proc.index)

    def _signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self._reload()
        else:
            self.stopping = True
        forward = signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM
        for proc in self.procs.values():
            if proc.pid is not None:
                os.kill(proc.pid, forward)

    def _reload(self) -> None:
        # Workers reload themselves (and log it); the supervisor keeps the newest valid config for restarts.
        if self.config_path is None:
            return
        with contextlib.suppress(cfg.ConfigError, OSError):
            self.config = cfg.load_config(self.config_path)

    def _wait_all(self) -> int:
        deadline = time.monotonic() + self.config.shutdown_timeout_s + 5.0
        while self.procs:
            left = deadline - time.monotonic()
            done = mpc.wait(list(self.procs), timeout=max(0.0, left))
            if not done:
                for proc in self.procs.values():
                    log.error("worker pid %d did not drain in time; killing it", proc.pid)
                    proc.kill()
                deadline = time.monotonic() + 5.0
            for sentinel in done:
                self._reap(sentinel)
        return 0 if all(c == 0 for c in self.exit_codes) else 1


def _drain_when_orphaned() -> None:
    """Linux: a worker gets SIGTERM (and drains) when its supervisor dies, even by SIGKILL, instead of lingering."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _clear(path: str) -> None:
    for stale in Path(path).glob("*.db"):
        stale.unlink()


class TurnBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A `StreamHandler` that writes the lines formatted during one event-loop turn in one write at the turn's end
    (at once where no loop runs), instead of one write and flush per record: a serving process logs a line per
    request. Records reach every other handler as usual; `flush()` writes what is pending."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self.pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self.pending.append(line)
        if len(self.pending) > 1:
            return  # this turn's write is already scheduled
        try:
            # Only for a turn's first line: on Python 3.11 each call is a getpid() system call.
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:
            self.flush()

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():
            lines, self.pending = self.pending, []
            if lines and self.stream is not None:
                try:
                    self.stream.write("".join(lines))
                    self.stream.flush()
                except Exception:  # a closed or broken stderr must never fail a request
                    pass


class MessageFormatter(logging.Formatter):
    """`%(message)s`, and a traceback when there is one: the message is the whole line. A record without one skips
    `Formatter.format`'s style look-ups, which a serving process would pay per request."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = message = record.getMessage()
        return message


def setup_logging(level: str) -> None:
    """Message-only lines on stderr, written once per event-loop turn (`TurnBufferedHandler`). Handlers a program
    attaches to a logger (`gateway.access` for a log shipper) receive its records as they are logged. Records skip
    what this format never prints: thread and process (the logging HOWTO's "Optimization" list); the access line
    is made without a look-up of its caller's frame (middleware.write_access)."""
    handler = TurnBufferedHandler(sys.stderr)
    handler.setFormatter(MessageFormatter())
    logging.basicConfig(level=level, handlers=[handler])
    atexit.register(handler.flush)  # writes what is pending before the process exits
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _worker_main(
    config: cfg.Config, config_path: str | None, host: str, port: int, ready: Any, index: int
) -> None:
    setup_logging(config.log_level)
    _drain_when_orphaned()

    def announce() -> None:
        ready.send(os.getpid())

    code = run_loop(serve(config, config_path, host=host, port=port, reuse_port=True, on_ready=announce))
    sys.exit(code)
