"""EngineLoop answers every submitted request, even when the engine dies or shuts down meanwhile.

A fake engine stands in for LLMEngine (the loop only calls its request API), so a step can be
held open while requests queue up behind it.
"""

from __future__ import annotations

import threading

import pytest

from engine.engine import EngineStats
from engine.loop import EngineDeadError, EngineLoop
from scheduler.output import RequestOutput
from scheduler.request import FinishReason, SamplingParams


class FakeEngine:
    """Each step blocks until released, then raises `fault` if set, else finishes everything."""

    def __init__(self):
        self.requests: list[str] = []
        self.in_step = threading.Event()
        self.release = threading.Event()
        self.fault: Exception | None = None

    def validate(self, prompt_token_ids, params):
        pass

    def stats(self):
        return EngineStats(num_running=len(self.requests))

    def add_request(self, request_id, prompt_token_ids, params, priority=0):
        self.requests.append(request_id)

    def abort(self, request_id):
        return request_id in self.requests

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        self.in_step.set()
        assert self.release.wait(10)
        if self.fault is not None:
            raise self.fault
        done, self.requests = self.requests, []
        return [RequestOutput(r, finished=True, finish_reason=FinishReason.LENGTH) for r in done]


class Outputs:
    def __init__(self):
        self.finished: dict[str, RequestOutput] = {}
        self.event = threading.Event()

    def __call__(self, out: RequestOutput):
        if out.finished:
            self.finished[out.request_id] = out
            self.event.set()


def _loop_with_a_step_in_progress():
    engine = FakeEngine()
    loop = EngineLoop(engine)
    loop.start()
    outputs = Outputs()
    loop.submit("running", [1], SamplingParams(), outputs)
    assert engine.in_step.wait(10)
    loop.submit("queued", [1], SamplingParams(), outputs)  # waits behind the step
    return engine, loop, outputs


def test_a_crash_fails_queued_requests_and_refuses_new_ones():
    engine, loop, outputs = _loop_with_a_step_in_progress()
    engine.fault = RuntimeError("boom")
    engine.release.set()
    loop._thread.join(10)
    assert set(outputs.finished) == {"running", "queued"}
    assert all(o.finish_reason == FinishReason.ERROR and "boom" in o.error
               for o in outputs.finished.values())
    with pytest.raises(EngineDeadError):
        loop.submit("late", [1], SamplingParams(), outputs)


def test_shutdown_cancels_queued_requests():
    engine, loop, outputs = _loop_with_a_step_in_progress()
    stopper = threading.Thread(target=loop.shutdown)
    stopper.start()
    engine.release.set()
    stopper.join(10)
    assert outputs.finished["running"].finish_reason == FinishReason.LENGTH
    assert outputs.finished["queued"].finish_reason == FinishReason.CANCELLED
    with pytest.raises(EngineDeadError):
        loop.submit("late", [1], SamplingParams(), outputs)
