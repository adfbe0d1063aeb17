"""Step outputs reach the event loop in ONE hand-off per engine step, complete and in order.

EngineLoop.set_output_sink: the engine thread gives each step's (callback, output) pairs to
the sink in one call; the servicer's sink does one call_soon_threadsafe per step. Checked on
the loop alone, and in-process through the real gRPC server with many concurrent streams,
by counting the engine thread's call_soon_threadsafe calls (a count, not a timing).
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict

import grpc

from engine.engine import EngineConfig, LLMEngine
from engine.loop import EngineLoop
from engine.tokenizer import Tokenizer
from mistral_serve.v1 import generation_pb2 as pb
from mistral_serve.v1 import generation_pb2_grpc as pb_grpc
from scheduler.output import RequestOutput
from scheduler.request import FinishReason, SamplingParams
from service.config import ServerConfig
from service.server import Server
from tests.test_service_e2e import free_port


def _engine(model_dir, max_num_seqs: int = 64) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(model_dir), kv_cache_memory_gib=0.05,
                                              max_num_seqs=max_num_seqs))


def test_sink_gets_each_step_in_one_call_and_callbacks_are_not_called(model_dir):
    engine = _engine(model_dir)
    loop = EngineLoop(engine)
    batches: list[list[tuple[object, RequestOutput]]] = []
    done = threading.Event()
    n, max_tokens = 24, 6

    def sink(pairs):
        batches.append(list(pairs))
        if sum(out.finished for batch in batches for _, out in batch) == n:
            done.set()

    def direct(out):  # the sink delivers: the loop must not call callbacks itself
        raise AssertionError(f"callback called directly for {out.request_id}")

    loop.set_output_sink(sink)
    loop.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        for i in range(n):
            loop.submit(f"r{i}", [1, 100 + i, 200 + i], params, direct)
        assert done.wait(60), "not every request finished"
    finally:
        loop.shutdown()
    tokens: dict[str, list[int]] = defaultdict(list)
    ended: set[str] = set()
    for batch in batches:
        ids = [out.request_id for _, out in batch]
        assert len(ids) == len(set(ids)), "one step gives a request at most one output"
        for cb, out in batch:
            assert cb is direct
            assert out.request_id not in ended, "an output after the finished one"
            if out.finished:
                ended.add(out.request_id)
            tokens[out.request_id] += out.new_token_ids
    assert len(batches) <= engine.num_steps + 1  # one sink call per step, not per request
    assert sum(len(b) for b in batches) > 2 * len(batches)  # steps really carried many outputs
    assert {rid: len(t) for rid, t in tokens.items()} == {f"r{i}": max_tokens for i in range(n)}
    finished = [out for batch in batches for _, out in batch if out.finished]
    assert all(out.finish_reason == FinishReason.LENGTH for out in finished)


def test_without_a_sink_callbacks_are_called_per_output(model_dir):
    engine = _engine(model_dir)
    loop = EngineLoop(engine)
    got: dict[str, list[RequestOutput]] = defaultdict(list)
    done = threading.Event()

    def on_output(out):
        got[out.request_id].append(out)
        if out.finished and len(got) == 3 and all(o[-1].finished for o in got.values()):
            done.set()

    loop.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        for i in range(3):
            loop.submit(f"r{i}", [1, 5 + i], params, on_output)
        assert done.wait(60)
    finally:
        loop.shutdown()
    assert all(sum(len(o.new_token_ids) for o in outs) == 4 for outs in got.values())


def test_many_streams_get_every_token_in_order_with_one_wakeup_per_step(model_dir):
    n, max_tokens = 48, 12
    tokenizer = Tokenizer.from_dir(model_dir)
    prompts = [tokenizer.encode(f"stream number {i} says hello", add_bos=True) for i in range(n)]

    async def main():
        config = ServerConfig(port=free_port(), metrics_port=0, log_level="warning",
                              engine_process=False)  # counts the engine thread's wake-ups
        server = Server(config, EngineConfig(model=str(model_dir), kv_cache_memory_gib=0.05,
                                             max_num_seqs=64))
        aio_loop = asyncio.get_running_loop()
        handoffs = {"engine": 0}
        real = aio_loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):  # counts the engine thread's wake-ups
            if threading.current_thread().name == "engine-loop":
                handoffs["engine"] += 1
            return real(callback, *args, **kwargs)

        aio_loop.call_soon_threadsafe = counting
        await server.start()
        assert await server.load()
        engine = server.engine_loop.engine
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{config.port}") as channel:
                stub = pb_grpc.GenerationStub(channel)

                async def stream(ids):
                    req = pb.GenerateRequest(
                        token_ids=pb.TokenIds(ids=ids),
                        sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens,
                                                   ignore_eos=True))
                    return [m async for m in stub.GenerateStream(req)]

                solo = await asyncio.gather(*(stream(p) for p in prompts[:2]))
                steps_before, handoffs_before = engine.num_steps, handoffs["engine"]
                results = await asyncio.gather(*(stream(p) for p in prompts))
                steps = engine.num_steps - steps_before
                wakeups = handoffs["engine"] - handoffs_before
        finally:
            server.request_stop()
            await server.shutdown()
        return solo, results, steps, wakeups

    solo, results, steps, wakeups = asyncio.run(main())
    for messages in results:
        ids = [t for m in messages for t in m.token_ids]
        assert len(ids) == max_tokens
        assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert all(not m.finish_reason for m in messages[:-1])
        assert messages[-1].usage.completion_tokens == max_tokens
    # Greedy: a stream run among 47 others matches the same prompt run with one other.
    for alone, together in zip(solo, results):
        assert [t for m in alone for t in m.token_ids] == [t for m in together for t in m.token_ids]
    total_outputs = n * max_tokens
    # One hand-off per engine step (plus at most one when the loop went idle), however many
    # streams a step served: the per-request scheme would make ~n * max_tokens wake-ups.
    assert wakeups <= steps + 1, (wakeups, steps)
    assert total_outputs > 4 * steps
