"""End to end: a real `mistral-serve serve` process on free ports, called with a real gRPC client.

One server is shared by most tests (module fixture); auth + TLS + a small queue share a second;
the shutdown tests start their own. The model is a tiny random-weight float32 checkpoint.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from mistral_serve.v1 import generation_pb2 as pb
from mistral_serve.v1 import generation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
SERVICE = "mistral_serve.v1.Generation"
MAX_TOKENS_CAP = 8192  # the server default; requests above it are refused
API_KEY = "test-key-0123456789"
SECRET = "SECRET-PROMPT-TEXT-do-not-log"
Code = grpc.StatusCode


# ---- server processes ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    root_cert: Optional[bytes] = None
    startup_statuses: list[str] = field(default_factory=list)  # health seen while starting

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.aio.Channel:
        if self.root_cert is None:
            return grpc.aio.insecure_channel(self.target)
        return grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(self.root_cert))

    def sync_channel(self) -> grpc.Channel:
        # Retry connecting every few ms (gRPC's default backoff waits a second or more), so
        # the short NOT_SERVING phase while the model loads is seen.
        options = [("grpc.initial_reconnect_backoff_ms", 5), ("grpc.min_reconnect_backoff_ms", 5),
                   ("grpc.max_reconnect_backoff_ms", 20)]
        if self.root_cert is None:
            return grpc.insecure_channel(self.target, options)
        return grpc.secure_channel(self.target, grpc.ssl_channel_credentials(self.root_cert),
                                   options)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels`."""
        total, found = 0.0, False
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
                    found = True
        assert found, f"metric {name}{labels or ''} not exported"
        return total

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def launch(model_dir: Optional[Path], workdir: Path, *extra: str,
           root_cert: Optional[bytes] = None, env: Optional[dict] = None) -> ServerProcess:
    """Start `python -m service.cli serve` (no --model when model_dir is None)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, **(env or {})}  # keeps LD_PRELOAD (OpenBLAS) from the test environment
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "proto"),
                                         env.get("PYTHONPATH", "")])
    log_path = workdir / "server.log"
    model = ["--model", str(model_dir)] if model_dir is not None else []
    cmd = [sys.executable, "-m", "service.cli", "serve", *model,
           "--port", str(port), "--metrics-port", str(metrics_port),
           "--kv-cache-memory", "0.05", *extra]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT)
    return ServerProcess(proc, port, metrics_port, log_path, root_cert)


def start_server(model_dir: Optional[Path], workdir: Path, *extra: str,
                 root_cert: Optional[bytes] = None, env: Optional[dict] = None,
                 timeout: float = 120) -> ServerProcess:
    """launch() and wait until health says SERVING, recording the statuses seen on the way."""
    server = launch(model_dir, workdir, *extra, root_cert=root_cert, env=env)
    proc = server.proc
    names = health_pb2.HealthCheckResponse.ServingStatus.Name
    deadline = time.monotonic() + timeout
    with server.sync_channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"server not SERVING after {timeout} s:\n{server.log()}")
            try:
                status = names(health.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
            except grpc.RpcError:
                status = None  # not listening yet
            if status and (not server.startup_statuses or server.startup_statuses[-1] != status):
                server.startup_statuses.append(status)
            if status == "SERVING":
                return server
            time.sleep(0.01)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def secure_server(model_dir, tmp_path_factory, tls_files):
    """TLS + API key, one request running at a time and one waiting (to fill the queue)."""
    cert, key = tls_files
    key_file = tmp_path_factory.mktemp("secrets") / "api_key"
    key_file.write_text(API_KEY + "\n")
    s = start_server(model_dir, tmp_path_factory.mktemp("secure"), "--tls-cert", str(cert),
                     "--tls-key", str(key), "--api-key-file", str(key_file),
                     "--max-num-seqs", "1", "--max-waiting", "1", root_cert=cert.read_bytes())
    yield s
    assert s.stop() == 0, s.log()


# ---- client helpers ------------------------------------------------------------------------
def request(prompt: Optional[str] = "Hello there, how are you today?", *, max_tokens: int = 8,
            temperature: float = 0.0, **sampling) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, ignore_eos=True, **sampling))
    if prompt is not None:
        req.prompt = prompt
    return req


async def stream_all(stub, req, metadata=None, timeout=60) -> list[pb.GenerateStreamResponse]:
    return [m async for m in stub.GenerateStream(req, metadata=metadata, timeout=timeout)]


async def read_rest(call) -> list[pb.GenerateStreamResponse]:
    """The remaining messages of a stream already read with call.read()."""
    msgs = []
    while (m := await call.read()) is not grpc.aio.EOF:
        msgs.append(m)
    return msgs


def joined(messages: list[pb.GenerateStreamResponse]) -> tuple[list[int], str]:
    return [t for m in messages for t in m.token_ids], "".join(m.text for m in messages)


async def wait_kv_idle(server: ServerProcess, timeout: float = 15) -> None:
    """Until no request runs or waits and no KV block is held."""
    deadline = time.monotonic() + timeout
    while True:
        used = server.metric("mistral_serve_kv_cache_blocks_used")
        running = server.metric("mistral_serve_num_requests_running")
        waiting = server.metric("mistral_serve_num_requests_waiting")
        if used == running == waiting == 0:
            return
        assert time.monotonic() < deadline, \
            f"KV not idle: {used} blocks used, {running} running, {waiting} waiting"
        await asyncio.sleep(0.05)


async def wait_metric(server: ServerProcess, name: str, value: float, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while server.metric(name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.02)


# ---- generation ----------------------------------------------------------------------------
def test_stream_and_unary_agree_at_temperature_0(server, tokenizer):
    prompt = "The quick brown fox jumps over the lazy dog, and then " * 2

    async def main():
        async with server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            msgs = await stream_all(stub, request(prompt, max_tokens=12, logprobs=2))
            unary = await stub.Generate(request(prompt, max_tokens=12, logprobs=2))
            return msgs, unary

    msgs, unary = asyncio.run(main())
    ids, text = joined(msgs)
    assert len(ids) == 12 and ids == list(unary.token_ids)
    assert text == unary.text == tokenizer.decode(ids)
    assert msgs[-1].finish_reason == unary.finish_reason == pb.FINISH_REASON_LENGTH
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    assert not any(m.HasField("usage") for m in msgs[:-1])
    prompt_len = len(tokenizer.encode(prompt, add_bos=True))
    assert msgs[-1].usage.prompt_tokens == unary.usage.prompt_tokens == prompt_len
    assert msgs[-1].usage.completion_tokens == unary.usage.completion_tokens == 12
    # The second identical prompt reuses the first one's full KV blocks.
    assert unary.usage.cached_tokens >= 16
    stream_lps = [lp for m in msgs for lp in m.logprobs]
    assert [lp.token_id for lp in stream_lps] == ids == [lp.token_id for lp in unary.logprobs]
    for a, b in zip(stream_lps, unary.logprobs):
        assert a.logprob <= 0 and math.isclose(a.logprob, b.logprob, abs_tol=1e-3)
        assert len(a.top) == 2 and a.top[0].logprob >= a.top[1].logprob
        assert a.top[0].token_id == a.token_id  # greedy: the sampled token is the best


def test_seeded_sampling_is_reproducible(server):
    async def main():
        async with server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            req = request("Once upon a time", max_tokens=10, temperature=1.0, seed=1234)
            a = await stub.Generate(req)
            b = joined(await stream_all(stub, req))[0]
            c = await stub.Generate(request("Once upon a time", max_tokens=10,
                                            temperature=1.0, seed=99, logprobs=0))
            return a, b, c

    a, b, c = asyncio.run(main())
    assert list(a.token_ids) == b and len(b) == 10
    assert list(c.token_ids) != b  # another seed, another sample (a flat random model)
    assert not a.logprobs  # logprobs unset: none returned
    # logprobs=0: the sampled token's logprob, no alternatives
    assert [lp.token_id for lp in c.logprobs] == list(c.token_ids)
    assert all(lp.logprob <= 0 and not lp.top for lp in c.logprobs)


def test_chat_token_ids_and_stop_string(server, tokenizer):
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="system", content="Be brief."),
                                     pb.ChatMessage(role="user", content="Say hello.")])

    async def main():
        async with server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            by_chat = await stub.Generate(pb.GenerateRequest(
                chat=chat, sampling=pb.SamplingParams(temperature=0, max_tokens=24,
                                                      ignore_eos=True)))
            ids = tokenizer.encode_chat([{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Say hello."}])
            by_ids = await stub.Generate(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=ids),
                sampling=pb.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)))
            text = by_chat.text
            stop = text[len(text) // 2:len(text) // 2 + 3]
            stopped = await stub.Generate(pb.GenerateRequest(
                chat=chat, sampling=pb.SamplingParams(temperature=0, max_tokens=24,
                                                      ignore_eos=True, stop=[stop])))
            return by_chat, by_ids, ids, stop, stopped

    by_chat, by_ids, ids, stop, stopped = asyncio.run(main())
    assert list(by_chat.token_ids) == list(by_ids.token_ids)
    assert by_chat.usage.prompt_tokens == len(ids)
    assert len(by_chat.text) >= 6, "the random model should say something"
    assert stopped.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert stopped.text == by_chat.text[:by_chat.text.find(stop)]


def test_16_concurrent_streams_complete_and_match_solo(server):
    prompts = [f"Request number {i}: tell me something about the number {i * 7}."
               for i in range(16)]

    async def main():
        async with server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            solo = await stub.Generate(request(prompts[5], max_tokens=10))
            streams = await asyncio.gather(*(stream_all(stub, request(p, max_tokens=10))
                                             for p in prompts))
            return solo, streams

    solo, streams = asyncio.run(main())
    for msgs in streams:
        ids, _ = joined(msgs)
        assert len(ids) == 10 and msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert len({m.request_id for m in msgs}) == 1 and msgs[0].request_id
    assert len({s[0].request_id for s in streams}) == 16  # the server made up unique ids
    assert joined(streams[5])[0] == list(solo.token_ids)  # batching does not change output


def test_cancelled_streams_free_their_kv_blocks(server):
    async def main():
        async with server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            calls = [stub.GenerateStream(request(f"Cancel me {i} " * 10, max_tokens=4000))
                     for i in range(4)]
            for call in calls:
                await call.read()
                await call.read()
            assert server.metric("mistral_serve_kv_cache_blocks_used") > 0
            assert server.metric("mistral_serve_num_requests_running") == 4
            for call in calls:
                call.cancel()
            for call in calls:
                assert await call.code() == Code.CANCELLED
            await wait_kv_idle(server)

    asyncio.run(main())
    assert server.metric("mistral_serve_request_success_total", finished_reason="cancelled") >= 4


def test_deadline_exceeded_frees_kv(server):
    async def main():
        async with server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stream_all(stub, request(max_tokens=MAX_TOKENS_CAP), timeout=0.5)
            assert err.value.code() == Code.DEADLINE_EXCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request(max_tokens=MAX_TOKENS_CAP), timeout=0.5)
            assert err.value.code() == Code.DEADLINE_EXCEEDED
            await wait_kv_idle(server)

    asyncio.run(main())
    assert "deadline_exceeded" in server.log()


def test_duplicate_request_id_is_refused_while_running(server):
    async def main():
        async with server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            first = request(max_tokens=4000)
            first.request_id = "dup-id"
            call = stub.GenerateStream(first)
            assert (await call.read()).request_id == "dup-id"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(first)
            call.cancel()
            await wait_kv_idle(server)
            return err.value

    err = asyncio.run(main())
    assert err.code() == Code.INVALID_ARGUMENT and "already in use" in err.details()


def _bad(prompt: Optional[str] = "hi", **sampling) -> pb.GenerateRequest:
    return request(prompt, **{"max_tokens": 4, **sampling})


def _with(req: pb.GenerateRequest, **fields) -> pb.GenerateRequest:
    for k, v in fields.items():
        if k == "chat":
            req.chat.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c)
                                                        for r, c in v]))
        elif k == "token_ids":
            req.token_ids.CopyFrom(pb.TokenIds(ids=v))
        else:
            setattr(req, k, v)
    return req


BAD_REQUESTS = [  # (name, request, what the message must say)
    ("no input", _bad(None), "no input"),
    ("empty prompt", _bad(""), "prompt is empty"),
    ("empty token ids", _with(_bad(None), token_ids=[]), "token_ids is empty"),
    ("token id outside vocab", _with(_bad(None), token_ids=[1, 10**9]), "outside the vocabulary"),
    ("prompt longer than context", _with(_bad(None), token_ids=[5] * 32768),
     "prompt has 32768 tokens"),
    ("chat without messages", _with(_bad(None), chat=[]), "no messages"),
    ("chat unknown role", _with(_bad(None), chat=[("robot", "beep")]), "role 'robot'"),
    ("chat ends with assistant", _with(_bad(None), chat=[("user", "a"), ("assistant", "b")]),
     "user"),
    ("negative temperature", _bad(temperature=-0.5), "temperature must be >= 0"),
    ("NaN temperature", _bad(temperature=float("nan")), "temperature must be a finite"),
    ("top_p 0", _bad(top_p=0.0), "top_p must be in (0, 1]"),
    ("top_p above 1", _bad(top_p=1.5), "top_p must be in (0, 1]"),
    ("negative top_k", _bad(top_k=-1), "top_k must be >= 0"),
    ("min_p above 1", _bad(min_p=2.0), "min_p"),
    ("repetition_penalty 0", _bad(repetition_penalty=0.0), "repetition_penalty"),
    ("presence_penalty 3", _bad(presence_penalty=3.0), "presence_penalty"),
    ("frequency_penalty -3", _bad(frequency_penalty=-3.0), "frequency_penalty"),
    ("infinite frequency_penalty", _bad(frequency_penalty=float("inf")), "finite"),
    ("max_tokens 0", _bad(max_tokens=0), "max_tokens must be >= 1"),
    ("negative max_tokens", _bad(max_tokens=-3), "max_tokens must be >= 1"),
    ("max_tokens above cap", _bad(max_tokens=MAX_TOKENS_CAP + 1), f"<= {MAX_TOKENS_CAP}"),
    ("too many stop strings", _bad(stop=[f"s{i}" for i in range(17)]), "stop strings"),
    ("empty stop string", _bad(stop=[""]), "stop strings must be non-empty"),
    ("stop string too long", _bad(stop=["x" * 300]), "at most 256 characters"),
    ("stop token id outside vocab", _bad(stop_token_ids=[10**8]), "stop token id"),
    ("too many logprobs", _bad(logprobs=1000), "logprobs must be <="),
    ("negative logprobs", _bad(logprobs=-1), "logprobs must be >= 0"),
    ("request_id too long", _with(_bad(), request_id="r" * 200), "request_id"),
    ("request_id control char", _with(_bad(), request_id="a\nb"), "request_id"),
]


def test_bad_requests_get_invalid_argument_while_a_good_stream_runs(server):
    async def main():
        async with server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            good = asyncio.ensure_future(stream_all(stub, request(max_tokens=40)))

            async def outcome(req, streaming):
                try:
                    if streaming:
                        await stream_all(stub, req, timeout=10)
                    else:
                        await stub.Generate(req, timeout=10)
                except grpc.aio.AioRpcError as e:
                    return e.code(), e.details()
                return Code.OK, ""

            results = await asyncio.gather(*(outcome(req, streaming)
                                             for _, req, _ in BAD_REQUESTS
                                             for streaming in (False, True)))
            return await good, results

    good, results = asyncio.run(main())
    assert len(BAD_REQUESTS) >= 20
    failures = []
    for i, (code, details) in enumerate(results):
        name, _, needle = BAD_REQUESTS[i // 2]
        if code != Code.INVALID_ARGUMENT or needle.lower() not in details.lower():
            failures.append(f"{name} ({'stream' if i % 2 else 'unary'}): {code} {details!r}")
    assert not failures, "\n".join(failures)
    assert len(joined(good)[0]) == 40 and good[-1].finish_reason == pb.FINISH_REASON_LENGTH


# ---- other RPCs ----------------------------------------------------------------------------
def test_tokenize(server, tokenizer):
    async def main():
        async with server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            text = await stub.Tokenize(pb.TokenizeRequest(text="Hello world [INST] é"))
            no_bos = await stub.Tokenize(pb.TokenizeRequest(text="Hello world", add_bos=False))
            chat = await stub.Tokenize(pb.TokenizeRequest(chat=pb.ChatMessages(
                messages=[pb.ChatMessage(role="user", content="Hi")])))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Tokenize(pb.TokenizeRequest())
            return text, no_bos, chat, err.value

    text, no_bos, chat, err = asyncio.run(main())
    assert list(text.token_ids) == tokenizer.encode("Hello world [INST] é", add_bos=True)
    assert text.token_ids[0] == tokenizer.bos_token_id
    assert len(text.pieces) == len(text.token_ids) and text.pieces[0] == "<s>"
    assert tokenizer.begin_inst_id not in text.token_ids  # typed "[INST]" stays text
    assert list(no_bos.token_ids) == tokenizer.encode("Hello world")
    assert list(chat.token_ids) == tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert "[INST]" in chat.pieces
    assert err.code() == Code.INVALID_ARGUMENT and "no input" in err.details()


def test_model_info(server, model_dir):
    async def main():
        async with server.channel() as ch:
            return await pb_grpc.GenerationStub(ch).GetModelInfo(pb.GetModelInfoRequest())

    info = asyncio.run(main())
    assert info.model_name == model_dir.name and info.model_path == str(model_dir)
    assert (info.vocab_size, info.hidden_size, info.num_hidden_layers) == (32768, 64, 2)
    assert (info.num_attention_heads, info.num_key_value_heads, info.head_dim) == (4, 2, 16)
    assert info.intermediate_size == 128 and info.dtype == "float32"
    assert info.quantization_bits == 0 and not info.HasField("sliding_window")
    assert info.max_model_len == 32768 and info.block_size == 16
    assert info.kv_blocks_total == server.metric("mistral_serve_kv_cache_blocks_total") > 0
    assert (info.bos_token_id, info.eos_token_id) == (1, 2)


def test_health_and_reflection(server):
    assert server.startup_statuses[-1] == "SERVING"

    async def main():
        async with server.channel() as ch:
            health = health_pb2_grpc.HealthStub(ch)
            statuses = [(await health.Check(health_pb2.HealthCheckRequest(service=name))).status
                        for name in ("", SERVICE)]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
            answers = [a async for a in refl.ServerReflectionInfo(iter(reqs))]
            return statuses, err.value, answers

    statuses, err, answers = asyncio.run(main())
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert err.code() == Code.NOT_FOUND
    names = {s.name for s in answers[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto  # the .proto is served


def test_metrics_move_after_traffic(server, tokenizer, model_dir):
    def snapshot():
        return {name: server.metric(name) for name in (
            "mistral_serve_prompt_tokens_total", "mistral_serve_generation_tokens_total",
            "mistral_serve_time_to_first_token_seconds_count",
            "mistral_serve_inter_token_latency_seconds_count",
            "mistral_serve_e2e_request_latency_seconds_count",
            "mistral_serve_request_queue_time_seconds_count",
            "mistral_serve_prefix_cache_queries_total", "mistral_serve_prefix_cache_hits_total")}

    before = snapshot()
    length_before = server.metric("mistral_serve_request_success_total", finished_reason="length")
    prompt = f"{SECRET} and some more words to fill two KV blocks of sixteen tokens " * 2

    async def main():
        async with server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            return [await stub.Generate(request(prompt, max_tokens=6)) for _ in range(2)]

    outs = asyncio.run(main())
    after = snapshot()
    delta = {k.removeprefix("mistral_serve_"): after[k] - before[k] for k in after}
    prompt_len = len(tokenizer.encode(prompt, add_bos=True))
    assert prompt_len >= 32
    assert delta["prompt_tokens_total"] == 2 * prompt_len
    assert delta["generation_tokens_total"] == 12
    assert delta["time_to_first_token_seconds_count"] == 2
    assert delta["inter_token_latency_seconds_count"] >= 2
    assert delta["e2e_request_latency_seconds_count"] == 2
    assert delta["request_queue_time_seconds_count"] == 2
    assert delta["prefix_cache_queries_total"] > 0
    assert delta["prefix_cache_hits_total"] >= 16  # the repeat reuses at least one full block
    assert server.metric("mistral_serve_request_success_total",
                         finished_reason="length") == length_before + 2
    text = server.metrics_text()
    for name in ("mistral_serve_kv_cache_usage_ratio", "mistral_serve_num_preemptions_total",
                 "mistral_serve_mlx_active_memory_bytes", "mistral_serve_mlx_peak_memory_bytes",
                 "mistral_serve_mlx_cache_memory_bytes", "process_resident_memory_bytes"):
        assert f"\n{name}" in text, name
    assert f'model_name="{model_dir.name}"' in text
    # One log line per finished request, without the prompt.
    log = server.log()
    for out in outs:
        assert f"request {out.request_id}: {prompt_len} prompt" in log
    assert SECRET not in log


# ---- auth, TLS, queue limits (second server) -----------------------------------------------
def test_tls_and_api_key(secure_server):
    good = [("authorization", f"Bearer {API_KEY}")]
    bad_keys = [None, [("authorization", "Bearer wrong")], [("authorization", API_KEY)]]

    async def calls(ch, md):
        stub = pb_grpc.GenerationStub(ch)
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        list_req = reflection_pb2.ServerReflectionRequest(list_services="")
        return {
            "Generate": lambda: stub.Generate(request(max_tokens=2), metadata=md),
            "GenerateStream": lambda: stream_all(stub, request(max_tokens=2), metadata=md),
            "Tokenize": lambda: stub.Tokenize(pb.TokenizeRequest(text="hi"), metadata=md),
            "GetModelInfo": lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md),
            "reflection": lambda: _collect(refl.ServerReflectionInfo(iter([list_req]),
                                                                      metadata=md)),
        }

    async def main():
        async with secure_server.channel() as ch:
            codes = {}
            for md in bad_keys:
                for name, call in (await calls(ch, md)).items():
                    try:
                        await call()
                        codes[name, str(md)] = Code.OK
                    except grpc.aio.AioRpcError as e:
                        codes[name, str(md)] = e.code()
                        assert "authorization: Bearer" in e.details(), (name, md, e.code(), e.details())
            ok = {name: await call() for name, call in (await calls(ch, good)).items()}
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        async with grpc.aio.insecure_channel(secure_server.target) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=5)
        return codes, ok, health, err.value

    codes, ok, health, plaintext_err = asyncio.run(main())
    assert set(codes.values()) == {Code.UNAUTHENTICATED}, codes
    assert len(codes) == 5 * len(bad_keys)
    assert len(ok["Generate"].token_ids) == 2 and ok["Tokenize"].token_ids
    assert ok["GetModelInfo"].vocab_size == 32768
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # no key needed
    assert plaintext_err.code() == Code.UNAVAILABLE  # TLS only


async def _collect(aiter):
    return [x async for x in aiter]


def test_queue_full_gets_resource_exhausted(secure_server):
    md = [("authorization", f"Bearer {API_KEY}")]

    async def main():
        async with secure_server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            running = stub.GenerateStream(request(max_tokens=4000), metadata=md)
            await running.read()  # max_num_seqs 1: it holds the only slot
            waiting = stub.GenerateStream(request(max_tokens=4), metadata=md)
            await wait_metric(secure_server, "mistral_serve_num_requests_waiting", 1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request(max_tokens=4), metadata=md)
            running.cancel()
            rest = [m async for m in waiting]  # runs once the slot frees
            await wait_kv_idle(secure_server)
            return err.value, rest

    err, rest = asyncio.run(main())
    assert err.code() == Code.RESOURCE_EXHAUSTED and "retry" in err.details()
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH


# ---- shutdown ------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_stream_and_exits_0(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path, "--drain-seconds", "60")
    # The port opens before the model loads: health says NOT_SERVING until it is ready.
    assert server.startup_statuses == ["NOT_SERVING", "SERVING"]
    n = 1500

    async def main():
        async with server.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            call = stub.GenerateStream(request(max_tokens=n))
            msgs = [await call.read()]
            server.proc.send_signal(signal.SIGTERM)
            while (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status \
                    != health_pb2.HealthCheckResponse.NOT_SERVING:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request(max_tokens=2))
            assert call.done() is False, "the stream ended before the drain could be checked"
            msgs += await read_rest(call)
            return msgs, err.value

    msgs, err = asyncio.run(main())
    assert err.code() == Code.UNAVAILABLE and "shutting down" in err.details()
    assert len(joined(msgs)[0]) == n and msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert server.proc.wait(30) == 0, server.log()
    assert "draining 1 in-flight call" in server.log()


def test_drain_timeout_cancels_streams_and_exits_0(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path, "--drain-seconds", "0.3")

    async def main():
        async with server.channel() as ch:
            call = pb_grpc.GenerationStub(ch).GenerateStream(request(max_tokens=MAX_TOKENS_CAP))
            await call.read()
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read_rest(call)
            return err.value

    err = asyncio.run(main())
    assert err.code() in (Code.CANCELLED, Code.UNAVAILABLE), err
    assert server.proc.wait(30) == 0, server.log()
    assert "cancelling 1 call" in server.log()


# ---- startup -------------------------------------------------------------------------------
def test_no_model_serves_the_demo_model(tmp_path):
    server = start_server(None, tmp_path / "run", env={"MISTRAL_SERVE_CACHE": str(tmp_path)})
    try:
        async def main():
            async with server.channel() as ch:
                stub = pb_grpc.GenerationStub(ch)
                return (await stub.GetModelInfo(pb.GetModelInfoRequest()),
                        await stub.Generate(request(max_tokens=3)))

        info, out = asyncio.run(main())
    finally:
        assert server.stop() == 0, server.log()
    assert info.model_name == "mistral-serve-demo" and info.model_path.startswith(str(tmp_path))
    assert len(out.token_ids) == 3
    assert "built-in demo model" in server.log()


def test_bad_model_or_flags_exit_nonzero_with_a_reason(tmp_path):
    server = launch(tmp_path / "no-such-model", tmp_path / "run")
    assert server.proc.wait(60) == 1
    assert "cannot serve" in server.log() and "no-such-model" in server.log()
    from service.cli import main

    assert main(["serve", "--tls-cert", str(tmp_path / "missing.pem")]) == 2
    assert main(["serve", "--api-key", "k", "--api-key-file", str(tmp_path / "k")]) == 2
    with pytest.raises(SystemExit):
        main(["serve", "--log-level", "chatty"])


def test_engine_fault_is_internal_then_unavailable(model_dir):
    """In process, so the engine can be made to fail outside a model step (a failed step only
    fails its requests: tests/test_faults.py): INTERNAL for the request it was running,
    UNAVAILABLE afterwards, and health goes NOT_SERVING."""
    from engine.engine import EngineConfig
    from service.config import ServerConfig
    from service.server import Server

    async def main():
        srv = Server(ServerConfig(port=free_port(), metrics_port=0, engine_process=False),
                     EngineConfig(model=str(model_dir), kv_cache_memory_gib=0.05))
        await srv.start()
        assert await srv.load()
        watch = asyncio.ensure_future(srv.run_until_stopped())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.config.port}") as ch:
                stub = pb_grpc.GenerationStub(ch)
                assert len((await stub.Generate(request(max_tokens=2))).token_ids) == 2

                def fail():
                    raise RuntimeError("injected scheduler fault")

                srv.engine_loop.engine.scheduler.schedule = fail
                errors = []
                for _ in range(2):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Generate(request(max_tokens=2))
                    errors.append(err.value)
                health = health_pb2_grpc.HealthStub(ch)
                for _ in range(100):
                    status = (await health.Check(health_pb2.HealthCheckRequest())).status
                    if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                    await asyncio.sleep(0.05)
                return errors, status
        finally:
            srv.request_stop()
            await watch
            await srv.shutdown()

    errors, status = asyncio.run(main())
    assert errors[0].code() == Code.INTERNAL and "injected scheduler fault" in errors[0].details()
    assert errors[1].code() == Code.UNAVAILABLE and "restarted" in errors[1].details()
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
