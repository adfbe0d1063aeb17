"""`serve --engine-process`: the engine in a child process behind EngineLoop's API.

A real server (CLI) on free ports and a real gRPC client, as in tests/test_service_e2e.py:
the same tokens as the one-process server, cancellation freeing KV blocks in the child,
a clean stop, and a killed engine process failing its requests and health. And
EngineProcess on its own: admission limit, a request id reused after an abort.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mistral_serve.v1 import generation_pb2 as pb
from mistral_serve.v1 import generation_pb2_grpc as pb_grpc
from tests.test_service_e2e import joined, request, start_server, stream_all, wait_kv_idle

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def proc_server(model_dir, tmp_path_factory):
    s = start_server(model_dir, tmp_path_factory.mktemp("proc"), "--engine-process")
    yield s
    s.stop()


def _engine_child(pid: int) -> int:
    """The server's engine process (not multiprocessing's resource tracker)."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True,
                         text=True)
    (child,) = [int(line.split()[0]) for line in out.stdout.splitlines() if "spawn_main" in line]
    return child


def test_same_tokens_as_the_one_process_server(proc_server, server):
    async def tokens(srv, req):
        async with srv.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            streamed = joined(await stream_all(stub, req))[0]
            unary = list((await stub.Generate(req)).token_ids)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            return streamed, unary, info.kv_blocks_total, info.vocab_size
    req = request(max_tokens=12)
    one = asyncio.run(tokens(server, req))
    two = asyncio.run(tokens(proc_server, req))
    assert one == two and len(one[0]) == 12
    assert "(engine process)" in proc_server.log()


def test_concurrent_streams_and_cancels_free_kv_in_the_child(proc_server):
    async def main():
        async with proc_server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            done = await asyncio.gather(*[stream_all(stub, request(max_tokens=6 + i % 3))
                                          for i in range(12)])
            assert [len(joined(m)[0]) for m in done] == [6 + i % 3 for i in range(12)]
            calls = [stub.GenerateStream(request(max_tokens=4000))
                     for _ in range(4)]
            for call in calls:
                await call.read()  # running: blocks held in the child
            for call in calls:
                call.cancel()
        await wait_kv_idle(proc_server)
    asyncio.run(main())


def test_killed_engine_process_fails_requests_and_health(model_dir, tmp_path):
    srv = start_server(model_dir, tmp_path, "--engine-process")
    try:
        child = _engine_child(srv.proc.pid)

        async def main():
            async with srv.channel() as ch:
                stub = pb_grpc.GenerationStub(ch)
                call = stub.GenerateStream(request(max_tokens=4000))
                await call.read()
                os.kill(child, signal.SIGKILL)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    while True:
                        if await call.read() == grpc.aio.EOF:
                            break
                assert err.value.code() == Code.INTERNAL
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Generate(request(max_tokens=2))
                assert err.value.code() == Code.UNAVAILABLE
                health = health_pb2_grpc.HealthStub(ch)
                for _ in range(100):
                    status = (await health.Check(health_pb2.HealthCheckRequest())).status
                    if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        return
                    await asyncio.sleep(0.05)
                pytest.fail("health still SERVING after the engine process died")
        asyncio.run(main())
        assert srv.proc.poll() is None  # the server itself stays up
    finally:
        srv.stop()


def test_sigterm_stops_the_child_too(model_dir, tmp_path):
    srv = start_server(model_dir, tmp_path, "--engine-process")
    child = _engine_child(srv.proc.pid)
    assert srv.stop() == 0
    for _ in range(100):
        if not os.path.exists(f"/proc/{child}"):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the engine process outlived the server")


def test_engine_process_admission_and_reused_ids(model_dir):
    from engine.engine import EngineConfig
    from engine.loop import QueueFullError
    from engine.process import EngineProcess
    from scheduler.request import FinishReason, SamplingParams

    proc = EngineProcess(EngineConfig(model=str(model_dir), kv_cache_memory_gib=0.05,
                                      max_num_seqs=1), max_waiting=2)
    info, tokenizer = proc.start()
    try:
        outs: dict[str, list] = {}
        done = threading.Event()

        def collect(key):
            def cb(out):
                outs.setdefault(key, []).append(out)
                if key == "b" and out.finished:
                    done.set()
            return cb
        long = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
        prompt = tokenizer.encode("Hello there")
        proc.submit("x", prompt, long, collect("a"))  # runs (max_num_seqs=1)
        deadline = time.monotonic() + 30
        while not outs.get("a") and time.monotonic() < deadline:  # until x runs
            time.sleep(0.01)
        proc.submit("y", prompt, long, collect("w1"))  # waits
        proc.submit("z", prompt, long, collect("w2"))  # waits
        with pytest.raises(QueueFullError):
            proc.submit("q", prompt, long, collect("w3"))
        proc.abort("x")
        proc.abort("y")
        proc.abort("z")
        short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        deadline = time.monotonic() + 30
        while (not all(outs.get(k) and outs[k][-1].finished for k in ("a", "w1", "w2"))
               and time.monotonic() < deadline):  # all three cancelled: nothing queued
            time.sleep(0.02)
        proc.submit("x", prompt, short, collect("b"))  # the id again, after its abort
        assert done.wait(30)
        assert outs["a"][-1].finish_reason == FinishReason.CANCELLED
        assert sum(len(o.new_token_ids) for o in outs["b"]) == 3
        assert outs["b"][-1].finish_reason == FinishReason.LENGTH
        assert "w3" not in outs
    finally:
        proc.shutdown()
    assert not proc.is_alive
