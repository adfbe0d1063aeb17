"""The engine thread: the one thread that owns MLX, behind a thread-safe API.

gRPC handlers call submit() / abort() from any thread; outputs come back through the
per-request callback, called on the engine thread (it must be quick and never block).
A user with many requests (the service) can instead install an output sink: it gets each
step's (callback, output) pairs in ONE call, so the hand-over to another thread costs one
wake-up per step, not one per request.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from engine.engine import EngineStats, LLMEngine
from scheduler.output import RequestOutput
from scheduler.request import FinishReason, SamplingParams

log = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput], None]
# Gets one step's outputs, in order, with the callback each would have gone to.
OutputSink = Callable[[list[tuple[OutputCallback, RequestOutput]]], None]


class QueueFullError(RuntimeError):
    """Too many requests waiting; the service maps it to RESOURCE_EXHAUSTED."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served."""


@dataclass(frozen=True)
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    on_output: OutputCallback
    priority: int


@dataclass(frozen=True)
class _Abort:
    request_id: str


class EngineLoop:
    """Runs schedule -> execute -> update -> publish on a dedicated thread."""

    def __init__(self, engine: LLMEngine, max_waiting: int = 1024):
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._callbacks: dict[str, OutputCallback] = {}
        # Aborted requests whose CANCELLED output the next step brings, oldest first: it goes
        # to their callback even when a new request reuses the id meanwhile.
        self._aborted: dict[str, deque[Optional[OutputCallback]]] = {}
        self._lock = threading.Lock()  # guards _pending, _stats, _closed; never held over a step
        self._pending = 0  # submitted but not yet handed to the scheduler
        self._closed = False  # the thread is ending: submit() refuses (guarded by _lock)
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._sink: Optional[OutputSink] = None
        self.error: Optional[BaseException] = None

    # ---- thread-safe API -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop stepping; unfinished requests get a CANCELLED output."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
               on_output: OutputCallback, priority: int = 0) -> None:
        """Queue a request. Raises ValidationError, QueueFullError or EngineDeadError at once."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        self.engine.validate(prompt_token_ids, sampling_params)
        with self._lock:
            if self._closed:
                raise EngineDeadError("the engine is not running")
            if self._pending + self._stats.num_waiting >= self.max_waiting:
                raise QueueFullError(f"too many requests waiting (limit {self.max_waiting}); retry later")
            self._pending += 1
            # Queued under the lock, so _close() either sees this request or refuses it above.
            self._commands.put(_Submit(request_id, list(prompt_token_ids), sampling_params,
                                       on_output, priority))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed on the engine thread before the next step."""
        self._commands.put(_Abort(request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        with self._lock:
            return self._stats

    def num_queued(self, stats: Optional[EngineStats] = None) -> int:
        """Requests submitted and not running yet: still in the command queue or waiting
        (by `stats` when given, fresher than the last published ones)."""
        with self._lock:
            return self._pending + (stats or self._stats).num_waiting

    def set_output_sink(self, sink: Optional[OutputSink]) -> None:
        """Route step outputs through `sink` (None: back to calling each callback).

        sink(pairs) runs on the engine thread once per step (and once when the loop ends
        its requests) with that batch's (callback, output) pairs in order, and must be quick
        and never block; delivering each output to its callback is then the sink's job.
        Outputs answered outside a step (a refused duplicate id, a request still queued at
        shutdown) still call their callback directly, so callbacks must stay thread-safe.
        Set it before submitting requests.
        """
        self._sink = sink

    # ---- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._publish_stats()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._publish(self.engine.step())
                self._publish_stats()
        except BaseException as e:  # a fault in the engine itself: fail every request, loudly
            log.exception("engine loop crashed")
            self.error = e
            self._stop.set()
            self._close(f"engine failure: {type(e).__name__}: {e}")
            return
        self._close("server shutting down", FinishReason.CANCELLED)

    def _close(self, message: str, reason: FinishReason = FinishReason.ERROR) -> None:
        """Refuse new submits, then end every known or still-queued request (no engine call)."""
        with self._lock:
            self._closed = True
        queued = [cmd for cmd in self._take_commands() if isinstance(cmd, _Submit)]
        self._fail_all(message, reason)
        for cmd in queued:
            self._answer(cmd.on_output, final_output(cmd.request_id, message, reason))

    def _take_commands(self):
        """Every command queued so far, oldest first."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _drain_commands(self) -> None:
        handed_over = 0
        for cmd in self._take_commands():
            if isinstance(cmd, _Submit):
                handed_over += 1
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_token_ids,
                                            cmd.sampling_params, priority=cmd.priority)
                except Exception as e:  # e.g. a duplicate id: answer this request only
                    self._answer(cmd.on_output, final_output(cmd.request_id, str(e)))
                else:  # only now: a refused duplicate must not take the running one's callback
                    self._callbacks[cmd.request_id] = cmd.on_output
            elif self.engine.abort(cmd.request_id):
                self._aborted.setdefault(cmd.request_id, deque()).append(
                    self._callbacks.pop(cmd.request_id, None))
        if handed_over:
            # In one go: submit() must never see them gone from _pending yet missing from
            # num_waiting, or a burst would overfill the queue while a step runs.
            stats = self.engine.stats()
            with self._lock:
                self._pending -= handed_over
                self._stats = stats

    def _publish(self, outputs: list[RequestOutput]) -> None:
        sink = self._sink
        pairs: list[tuple[OutputCallback, RequestOutput]] = []
        for out in outputs:
            rid = out.request_id
            aborted = self._aborted.get(rid)
            if aborted and out.finish_reason == FinishReason.CANCELLED:
                cb = aborted.popleft()
                if not aborted:
                    del self._aborted[rid]
            else:
                cb = self._callbacks.pop(rid, None) if out.finished else self._callbacks.get(rid)
            if cb is not None:
                if sink is None:
                    self._answer(cb, out)
                else:
                    pairs.append((cb, out))
        if pairs:
            try:
                sink(pairs)
            except Exception:  # a broken consumer must not stop the engine
                log.exception("output sink failed for %d output(s)", len(pairs))

    @staticmethod
    def _answer(cb: OutputCallback, out: RequestOutput) -> None:
        try:
            cb(out)
        except Exception:  # a broken consumer must not stop the engine
            log.exception("output callback failed for %s", out.request_id)

    def _publish_stats(self) -> None:
        stats = self.engine.stats()
        with self._lock:
            self._stats = stats

    def _fail_all(self, message: str, reason: FinishReason = FinishReason.ERROR) -> None:
        for request_id, callbacks in self._aborted.items():  # their CANCELLED never came
            for cb in callbacks:
                if cb is not None:
                    self._answer(cb, final_output(request_id, message, FinishReason.CANCELLED))
        self._aborted.clear()
        self._publish([final_output(request_id, message, reason)
                       for request_id in list(self._callbacks)])


def final_output(request_id: str, message: str,
           reason: FinishReason = FinishReason.ERROR) -> RequestOutput:
    """A last output made by the loop itself (the engine never saw or can no longer step it)."""
    return RequestOutput(request_id, finished=True, finish_reason=reason,
                         error=message if reason == FinishReason.ERROR else None)
