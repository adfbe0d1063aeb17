"""Faults and memory pressure: a failed request or step ends only its own requests, with ERROR.

Engine-level tests step an LLMEngine (or its EngineLoop thread) in process on a tiny float32
model; faults come from engine/faults.py through ModelRunner.fault_hook. One test runs a real
server with MISTRAL_SERVE_FAULT_INJECTION=1. Long mode (MISTRAL_SERVE_LONG=1) adds requests.
"""

from __future__ import annotations

import asyncio
import os
import threading

import grpc
import mlx.core as mx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import faults
from engine.engine import EngineConfig, LLMEngine
from engine.kv_cache import kv_bytes_per_token
from engine.loop import EngineLoop
from engine.tokenizer import Tokenizer, write_tokenizer_files
from mistral_serve.v1 import generation_pb2 as pb
from mistral_serve.v1 import generation_pb2_grpc as pb_grpc
from scheduler.request import FinishReason, SamplingParams
from tests.test_engine import prompts_of, run
from tests.test_service_e2e import joined, request, start_server, wait_kv_idle
from tests.tiny import tiny_model

LONG = os.environ.get("MISTRAL_SERVE_LONG") == "1"
VOCAB = 32768
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d, version="v3")
    return Tokenizer.from_dir(d)


def make_engine(tokenizer, *, window=None, num_blocks=None, **cfg) -> LLMEngine:
    model, args, _ = tiny_model(seed=1, vocab_size=VOCAB, sliding_window=window)
    gib = 0.01
    if num_blocks is not None:  # a pool of exactly num_blocks blocks of 4 tokens
        gib = (num_blocks + 0.5) * 4 * kv_bytes_per_token(args, mx.float32) / (1 << 30)
    engine = LLMEngine(model, args, tokenizer, EngineConfig(kv_cache_memory_gib=gib,
                                                             block_size=4, **cfg))
    assert num_blocks is None or engine.kv_manager.num_blocks == num_blocks
    return engine


def solo_outputs(tokenizer, prompts: dict, params, **cfg) -> dict[str, list[int]]:
    """Each request run alone on a fresh-enough engine (one at a time, nothing shares it)."""
    engine = make_engine(tokenizer, **cfg)
    out = {}
    for rid, ids in prompts.items():
        p = params[rid] if isinstance(params, dict) else params
        out[rid] = run(engine, {rid: ids}, {rid: p})[0][rid]
    return out


def renamed(prompts: dict, victim: str, mark: str) -> tuple[dict, str]:
    """The same prompts with `victim`'s id carrying a fault mark; returns (prompts, new id)."""
    new_id = f"{victim}{mark}"
    return {new_id if rid == victim else rid: ids for rid, ids in prompts.items()}, new_id


# ---- one request fails -----------------------------------------------------------------------
def test_request_fault_fails_only_that_request(tokenizer):
    prompts = prompts_of([5, 17, 9, 30, 3, 12], seed=11)
    alone = solo_outputs(tokenizer, prompts, GREEDY)
    marked, victim = renamed(prompts, "r2", "@fail-request:3")
    engine = make_engine(tokenizer)
    engine.runner.fault_hook = faults.request_id_faults
    tokens, _, finish = run(engine, marked, GREEDY)

    assert finish[victim].finish_reason == FinishReason.ERROR
    assert "injected request fault after 3 tokens" in finish[victim].error
    assert tokens[victim] == alone["r2"][:3]  # what it streamed before the fault was right
    for rid in prompts.keys() - {"r2"}:
        assert finish[rid].finish_reason == FinishReason.LENGTH and tokens[rid] == alone[rid], rid
    assert engine.kv_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
    # The engine keeps stepping: a later request runs as usual.
    again = run(engine, {"late": prompts["r2"]}, GREEDY)[0]["late"]
    assert again == alone["r2"]


# ---- a whole step fails ----------------------------------------------------------------------
def test_step_fault_fails_the_steps_requests_and_the_engine_keeps_stepping(tokenizer):
    prompts = prompts_of([6, 11, 25, 4, 19], seed=12)
    alone = solo_outputs(tokenizer, prompts, GREEDY)
    marked, victim = renamed(prompts, "r1", "@fail-step:2")
    # Two requests run at a time: r0 and the victim share the failing step, r2..r4 wait.
    engine = make_engine(tokenizer, max_num_seqs=2)
    engine.runner.fault_hook = faults.request_id_faults
    steps_before = engine.num_steps
    tokens, _, finish = run(engine, marked, GREEDY)

    failed = {rid for rid, out in finish.items() if out.finish_reason == FinishReason.ERROR}
    assert failed == {"r0", victim}
    for rid in failed:
        assert "the model step failed (InjectedFault: injected step fault" in finish[rid].error
    assert tokens[victim] == alone["r1"][:2] and tokens["r0"] == alone["r0"][:2]
    for rid in ("r2", "r3", "r4"):
        assert finish[rid].finish_reason == FinishReason.LENGTH and tokens[rid] == alone[rid], rid
    assert engine.kv_manager.num_used_blocks == 0
    assert engine.num_steps > steps_before + 10  # r2..r4 ran their 10 tokens after the fault


def test_fault_after_the_forward_wrote_kv_leaves_other_requests_intact(tokenizer):
    """The failed step's queued KV writes land only in its own (freed, unhashed) blocks: a
    request that reuses the same prompt prefix from the prefix cache still gets right tokens."""
    prefix = prompts_of([16], seed=13)["r0"]
    prompts = {f"p{i}": prefix + prompts_of([3 + i], seed=20 + i)["r0"] for i in range(4)}
    alone = solo_outputs(tokenizer, prompts, GREEDY, enable_prefix_caching=False)
    engine = make_engine(tokenizer)
    forward = engine.runner._forward
    state = {"failed": False}

    def forward_then_fail(sched, **kw):
        result = forward(sched, **kw)  # KV writes of this step are queued
        if not state["failed"] and any(s.request_id in ("p1", "p2") for s in sched.scheduled):
            state["failed"] = True
            raise RuntimeError("fault after the forward pass was built")
        return result

    engine.runner._forward = forward_then_fail
    first = run(engine, {"p0": prompts["p0"]}, GREEDY)[0]  # its prefix blocks get cached
    _, _, finish = run(engine, {"p1": prompts["p1"], "p2": prompts["p2"]}, GREEDY)
    assert {out.finish_reason for out in finish.values()} == {FinishReason.ERROR}
    assert "fault after the forward pass was built" in finish["p1"].error
    assert engine.kv_manager.num_used_blocks == 0
    later, _, fin = run(engine, {"p3": prompts["p3"], "p1": prompts["p1"]}, GREEDY)
    assert fin["p3"].num_cached_tokens == 16  # served from the cache the failed step shared
    assert first["p0"] == alone["p0"] and later["p3"] == alone["p3"] and later["p1"] == alone["p1"]


def test_unusable_kv_cache_after_a_failed_step_is_fatal(tokenizer):
    engine = make_engine(tokenizer)

    def fail(_):
        raise RuntimeError("step fault")

    def broken_state():
        raise RuntimeError("pool lost")

    engine.runner.fault_hook = fail
    engine.kv_cache.state = broken_state
    engine.add_request("a", [5, 6, 7], GREEDY)
    with pytest.raises(RuntimeError, match="KV cache is unusable"):
        engine.step()


# ---- the engine thread -----------------------------------------------------------------------
class Collect:
    """An EngineLoop output callback that keeps every output and flags the final one."""

    def __init__(self):
        self.outputs = []
        self.done = threading.Event()

    def __call__(self, out):
        self.outputs.append(out)
        if out.finished:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.new_token_ids]

    @property
    def final(self):
        assert self.done.wait(30), "no final output"
        return self.outputs[-1]


def test_engine_loop_survives_step_faults(tokenizer):
    prompts = prompts_of([7, 13, 5], seed=14)
    alone = solo_outputs(tokenizer, prompts, GREEDY)
    engine = make_engine(tokenizer)
    engine.runner.fault_hook = faults.request_id_faults
    loop = EngineLoop(engine)
    loop.start()
    try:
        for round_ in range(3):  # fail, serve, fail, serve, ...
            victim = Collect()
            loop.submit(f"v{round_}@fail-step:1", prompts["r0"], GREEDY, victim)
            assert victim.final.finish_reason == FinishReason.ERROR
            assert "injected step fault" in victim.final.error
            good = {rid: Collect() for rid in prompts}
            for rid, ids in prompts.items():
                loop.submit(f"{rid}-{round_}", ids, GREEDY, good[rid])
            for rid, c in good.items():
                assert c.final.finish_reason == FinishReason.LENGTH and c.tokens == alone[rid]
        assert loop.is_alive and loop.error is None
        assert engine.kv_manager.num_used_blocks == 0
    finally:
        loop.shutdown()


def _held_loop(engine: LLMEngine):
    """An EngineLoop whose first step blocks until the returned event is set."""
    gate, entered = threading.Event(), threading.Event()

    def hold(_):
        entered.set()
        assert gate.wait(30)
        engine.runner.fault_hook = None

    engine.runner.fault_hook = hold
    loop = EngineLoop(engine)
    loop.start()
    return loop, gate, entered


def test_cancel_then_reuse_the_request_id(tokenizer):
    """Regression: the first request's CANCELLED output went to the second one (which then
    ran on unseen) and the second's end crashed the engine thread with a KeyError."""
    prompt = prompts_of([9], seed=15)["r0"]
    alone = solo_outputs(tokenizer, {"x": prompt}, GREEDY)["x"]
    engine = make_engine(tokenizer)
    loop, gate, entered = _held_loop(engine)
    try:
        old, new = Collect(), Collect()
        loop.submit("x", prompt, GREEDY, old)
        assert entered.wait(30)
        loop.abort("x")  # e.g. the client's deadline passed...
        loop.submit("x", prompt, GREEDY, new)  # ...and it retries with the same id
        gate.set()
        assert old.final.finish_reason == FinishReason.CANCELLED
        assert new.final.finish_reason == FinishReason.LENGTH and new.tokens == alone
        follow = Collect()
        loop.submit("y", prompt, GREEDY, follow)
        assert follow.final.finish_reason == FinishReason.LENGTH
        assert loop.is_alive and loop.error is None
        assert engine.kv_manager.num_used_blocks == 0
    finally:
        loop.shutdown()


def test_refused_duplicate_id_does_not_orphan_the_running_request(tokenizer):
    """Regression: a duplicate submit took the running request's callback, so the running one
    was never answered and its end crashed the engine thread."""
    prompt = prompts_of([9], seed=16)["r0"]
    engine = make_engine(tokenizer)
    loop, gate, entered = _held_loop(engine)
    try:
        first, dup = Collect(), Collect()
        loop.submit("x", prompt, GREEDY, first)
        assert entered.wait(30)
        loop.submit("x", prompt, GREEDY, dup)
        gate.set()
        assert dup.final.finish_reason == FinishReason.ERROR and "already in use" in dup.final.error
        assert first.final.finish_reason == FinishReason.LENGTH and len(first.tokens) == 10
        assert loop.is_alive and loop.error is None
    finally:
        loop.shutdown()


# ---- memory pressure -------------------------------------------------------------------------
# Full attention: 40 blocks of 4 tokens hold two or three of these ~60-token sequences. With
# a window of 8 a sequence keeps ~4 blocks (window + an 8-token chunk), so 12 blocks hold 3.
@pytest.mark.parametrize("window,num_blocks,chunk", [(None, 40, 32), (8, 12, 8)])
def test_memory_pressure_preempts_and_every_request_matches_alone(tokenizer, window, num_blocks,
                                                                  chunk):
    """Far more long requests than the KV pool holds: preemption + recompute, same tokens."""
    n = 24 if LONG else 8
    lengths = [24 + (7 * i) % 17 for i in range(n)]
    prompts = prompts_of(lengths, seed=17)
    params = {rid: SamplingParams(temperature=0 if i % 2 else 0.9, seed=100 + i,
                                  max_tokens=40 if LONG else 24, ignore_eos=True)
              for i, rid in enumerate(prompts)}
    alone = solo_outputs(tokenizer, prompts, params, window=window)
    engine = make_engine(tokenizer, window=window, num_blocks=num_blocks,
                         max_num_batched_tokens=chunk)
    tokens, _, finish = run(engine, prompts, params)
    print(f"\nmemory pressure (window {window}, {num_blocks} blocks): {n} requests, "
          f"{engine.scheduler.num_preemptions} preemptions, all equal to their solo runs")
    assert engine.scheduler.num_preemptions > 0
    for rid in prompts:
        assert finish[rid].finish_reason == FinishReason.LENGTH, rid
        assert tokens[rid] == alone[rid], rid
    assert engine.kv_manager.num_used_blocks == 0


# ---- through a real server -------------------------------------------------------------------


async def _outcome(stub, req):
    """(messages, status code, details) of one streaming call."""
    call = stub.GenerateStream(req, timeout=60)
    msgs = []
    try:
        async for m in call:
            msgs.append(m)
    except grpc.aio.AioRpcError as e:
        return msgs, e.code(), e.details()
    return msgs, grpc.StatusCode.OK, ""


def test_server_survives_injected_faults(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path, env={faults.ENV_VAR: "1"})
    prompts = [f"Fault test {i}: some words about the number {i}." for i in range(6)]

    def req(i, request_id=""):
        r = request(prompts[i], max_tokens=12)
        r.request_id = request_id
        return r

    async def main():
        async with server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            solo = [list((await stub.Generate(req(i))).token_ids) for i in range(6)]
            per_request = await asyncio.gather(
                *(_outcome(stub, req(i)) for i in range(5)),
                _outcome(stub, req(5, "victim@fail-request:3")))
            per_step = await asyncio.gather(
                *(_outcome(stub, req(i)) for i in range(5)),
                _outcome(stub, req(5, "victim@fail-step:4")))
            after = await stub.Generate(req(0))
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            await wait_kv_idle(server)
            return solo, per_request, per_step, after, health

    try:
        solo, per_request, per_step, after, health = asyncio.run(main())
    finally:
        assert server.stop() == 0, server.log()
    msgs, code, details = per_request[5]
    assert code == grpc.StatusCode.INTERNAL and "injected request fault" in details
    assert msgs[-1].finish_reason == pb.FINISH_REASON_ERROR  # the stream says so before ending
    assert joined(msgs)[0] == solo[5][:3]
    for i, (msgs, code, _) in enumerate(per_request[:5]):
        assert code == grpc.StatusCode.OK and joined(msgs)[0] == solo[i], i
    msgs, code, details = per_step[5]
    assert code == grpc.StatusCode.INTERNAL and "injected step fault" in details
    # Requests that shared the failed step fail too; every other one is undisturbed.
    for i, (msgs, code, details) in enumerate(per_step[:5]):
        if code != grpc.StatusCode.OK:
            assert code == grpc.StatusCode.INTERNAL and "model step failed" in details, details
            assert joined(msgs)[0] == solo[i][:len(joined(msgs)[0])]
        else:
            assert joined(msgs)[0] == solo[i], i
    assert list(after.token_ids) == solo[0]
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "FAULT INJECTION IS ON" in server.log()
