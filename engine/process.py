"""The engine in a process of its own (`serve --engine-process`), behind EngineLoop's API.

In one process the engine thread and the gRPC event loop share one GIL: at batch 128 the
engine's Python per step (scheduling, graph building, updates) and gRPC's per-message work
take turns, and the GPU waits on both (on an H200, gRPC reached 0.76x of the offline
engine's throughput at one message per token: loadtest/RESULTS.md). Here the child process
owns the model and runs an ordinary EngineLoop; the server process keeps the tokenizer, the
request validation and gRPC, and the two talk over a pipe:

    parent -> child   ("submit", token, request_id, prompt ids, params, priority)
                      ("abort", request_id)          ("stop",)
    child -> parent   ("ready", EngineInfo) | ("failed", message)    once, after loading
                      ("out", [(token, RequestOutput), ...], status)  one per engine step
                      ("status", status)              when idle, a few times a second
                      ("bye",)                        after the stop

`token` numbers each submission, so an output reaches the right callback even when a
request id is reused after an abort. A child that dies ends every request with an error
and the server reports NOT_SERVING, as a crashed engine thread does.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import sys
import threading
from dataclasses import dataclass
from typing import Optional

from engine.engine import EngineConfig, EngineInfo, EngineStats
from engine.loop import EngineDeadError, OutputCallback, OutputSink, QueueFullError, final_output
from engine.tokenizer import Tokenizer
from scheduler.output import RequestOutput
from scheduler.request import FinishReason, SamplingParams

log = logging.getLogger(__name__)

STATUS_INTERVAL = 0.2  # seconds between status messages while the child is idle


@dataclass(frozen=True)
class _Status:
    """The child's state as the parent's admission check and metrics need it."""

    stats: EngineStats
    queued: int  # submitted to the child's loop and not yet running
    received: int  # submissions the child has taken so far
    error: Optional[str] = None  # the child's engine loop crashed


class EngineProcess:
    """EngineLoop's API (start, submit, abort, stats, set_output_sink, shutdown, is_alive,
    error) over an engine that runs in a child process."""

    def __init__(self, config: EngineConfig, max_waiting: int = 1024, log_level: int = logging.INFO):
        self.config = config
        self.max_waiting = max_waiting
        self.log_level = log_level
        self.error: Optional[BaseException] = None
        self.info: Optional[EngineInfo] = None
        self.tokenizer: Optional[Tokenizer] = None
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process using MLX
        self._conn, child_conn = self._ctx.Pipe()
        # _child_main is looked up now: loadtest/host_overhead.py swaps in one that also
        # simulates device time (spawn finds a target by module and name).
        self._process = self._ctx.Process(target=_child_main, name="engine",
                                          args=(config, log_level, child_conn),
                                          daemon=True)
        self._child_conn = child_conn
        self._lock = threading.Lock()  # guards everything below and sends on the pipe
        self._callbacks: dict[int, tuple[str, OutputCallback]] = {}  # token -> (request id, cb)
        self._tokens = itertools.count()
        self._sent = 0
        self._status = _Status(EngineStats(), 0, 0)
        self._stopping = False
        self._sink: Optional[OutputSink] = None
        self._reader: Optional[threading.Thread] = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> tuple[EngineInfo, Tokenizer]:
        """Start the child and wait until it has loaded the model; blocks (call it off the
        event loop). Raises RuntimeError with the child's reason when loading fails."""
        self._process.start()
        self._child_conn.close()  # the child holds its end: EOF here when it dies
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            kind, payload = "failed", f"the engine process exited (code {self._process.exitcode})"
        if kind != "ready":
            self._process.join(5)
            raise RuntimeError(f"engine process: {payload}")
        self.info = payload
        self.tokenizer = Tokenizer.from_dir(payload.model_path)
        self._reader = threading.Thread(target=self._read, name="engine-process-reader",
                                        daemon=True)
        self._reader.start()
        return self.info, self.tokenizer

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the child; unfinished requests get their CANCELLED output first."""
        if self._process.pid is None:  # never started
            return
        with self._lock:
            self._stopping = True
            try:
                self._conn.send(("stop",))
            except (OSError, ValueError):  # already gone
                pass
        if self._reader is not None:
            self._reader.join(timeout)
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("engine process did not stop in %.0f s; killing it", timeout)
            self._process.kill()
            self._process.join(5)

    @property
    def is_alive(self) -> bool:
        return (self._process.is_alive() and self.error is None and not self._stopping
                and self._reader is not None and self._reader.is_alive())

    # ---- requests ----------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
               on_output: OutputCallback, priority: int = 0) -> None:
        """Queue a request. Raises ValidationError, QueueFullError or EngineDeadError at once."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        self.info.validate(prompt_token_ids, sampling_params)
        with self._lock:
            status = self._status
            if (self._sent - status.received) + status.queued >= self.max_waiting:
                raise QueueFullError(f"too many requests waiting (limit {self.max_waiting}); retry later")
            token = next(self._tokens)
            self._callbacks[token] = (request_id, on_output)
            self._sent += 1
            try:
                self._conn.send(("submit", token, request_id, list(prompt_token_ids),
                                 sampling_params, priority))
            except (OSError, ValueError) as e:
                self._callbacks.pop(token, None)
                raise EngineDeadError("the engine is not running") from e

    def abort(self, request_id: str) -> None:
        with self._lock:
            try:
                self._conn.send(("abort", request_id))
            except (OSError, ValueError):  # gone: its requests end with the reader
                pass

    def stats(self) -> EngineStats:
        with self._lock:
            return self._status.stats

    def set_output_sink(self, sink: Optional[OutputSink]) -> None:
        """As EngineLoop.set_output_sink: called on the reader thread once per step."""
        self._sink = sink

    # ---- reader thread -----------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "out":
                self._deliver(message[1])
                self._set_status(message[2])
            elif kind == "status":
                self._set_status(message[1])
            elif kind == "bye":
                break
        with self._lock:
            expected = self._stopping
            left, self._callbacks = self._callbacks, {}
        if not expected and self.error is None:
            self.error = EngineDeadError(
                f"the engine process exited (code {self._process.exitcode})")
            log.error("%s", self.error)
        for request_id, cb in left.values():  # the child never answered these
            _answer(cb, final_output(request_id, "server shutting down", FinishReason.CANCELLED)
                    if expected else final_output(request_id, f"engine failure: {self.error}"))

    def _set_status(self, status: _Status) -> None:
        with self._lock:
            self._status = status
        if status.error is not None and self.error is None:
            self.error = EngineDeadError(f"engine failure: {status.error}")

    def _deliver(self, items: list[tuple[int, RequestOutput]]) -> None:
        pairs = []
        with self._lock:
            for token, out in items:
                entry = self._callbacks.pop(token, None) if out.finished else self._callbacks.get(token)
                if entry is not None:
                    pairs.append((entry[1], out))
        sink = self._sink
        if sink is None:
            for cb, out in pairs:
                _answer(cb, out)
        elif pairs:
            try:
                sink(pairs)
            except Exception:  # a broken consumer must not stop the reader
                log.exception("output sink failed for %d output(s)", len(pairs))


def _answer(cb: OutputCallback, out: RequestOutput) -> None:
    try:
        cb(out)
    except Exception:  # a broken consumer must not stop the reader
        log.exception("output callback failed for %s", out.request_id)


# ---- the child process ----------------------------------------------------------------------
class _Tagged:
    """The child's callback for one submission: sends its outputs to the parent."""

    def __init__(self, token: int, send):
        self.token, self.send = token, send

    def __call__(self, out: RequestOutput) -> None:  # outputs outside a step
        self.send(("out", [(self.token, out)]))


def _child_main(config: EngineConfig, log_level: int, conn) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine import faults
    from engine.engine import LLMEngine
    from engine.loop import EngineLoop
    try:
        engine = LLMEngine.from_config(config)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which exits with it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    if faults.enabled_by_env():  # tests only, as in the one-process server
        engine.runner.fault_hook = faults.request_id_faults
    # Admission is the parent's alone (EngineProcess.submit counts what is in the pipe and
    # queued here). A second bound here judged by the loop's lagging stats snapshot refused
    # requests the parent had admitted, and those ended as errors (INTERNAL) in a burst.
    loop = EngineLoop(engine, max_waiting=sys.maxsize)
    lock = threading.Lock()
    received = 0

    def status(stats: Optional[EngineStats] = None) -> _Status:
        stats = stats or loop.stats()
        return _Status(stats, loop.num_queued(stats), received,
                       None if loop.error is None else f"{type(loop.error).__name__}: {loop.error}")

    def send(message: tuple, stats: Optional[EngineStats] = None) -> None:
        if message[0] == "out":
            message = (*message, status(stats))
        with lock:
            try:
                conn.send(message)
            except (OSError, ValueError):  # the parent is gone; the loop ends below
                pass

    # On the engine thread, after a step: the engine's own stats are current there (the loop
    # publishes its snapshot only after the sink), so the parent never admits on stale counts.
    def current_stats() -> EngineStats:
        try:
            return engine.stats()
        except Exception:  # a broken engine (its outputs must still go out): the snapshot
            return loop.stats()
    loop.set_output_sink(lambda pairs: send(("out", [(cb.token, out) for cb, out in pairs]),
                                            current_stats()))
    loop.start()
    conn.send(("ready", engine.info))
    stop = threading.Event()

    def report() -> None:  # keeps the parent's admission check and gauges fresh when idle
        while not stop.wait(STATUS_INTERVAL):
            send(("status", status()))
    threading.Thread(target=report, name="engine-status", daemon=True).start()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the parent died: stop serving
                break
            if message[0] == "submit":
                _, token, request_id, prompt, params, priority = message
                received += 1
                try:
                    loop.submit(request_id, prompt, params, _Tagged(token, send), priority=priority)
                except Exception as e:  # refused here (queue full, engine dead): this request only
                    send(("out", [(token, final_output(request_id, str(e)))]))
            elif message[0] == "abort":
                loop.abort(message[1])
            elif message[0] == "stop":
                break
    finally:
        loop.shutdown()  # the remaining requests' CANCELLED outputs go out through the sink
        stop.set()
        send(("bye",))
    # Leave without the interpreter's teardown: on CUDA, MLX's static destructors ran with a
    # thread of its own still joinable and the child aborted ("terminate called without an
    # active exception"). Everything the parent needs has been sent.
    conn.close()
    logging.shutdown()
    os._exit(0)
