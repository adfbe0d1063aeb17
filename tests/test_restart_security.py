"""Restart safety and the server's security defaults, against real server processes.

- SIGKILL mid-stream, restart on the same ports and demo-model cache: serving again at once.
- A writer killed while writing the demo model leaves nothing a later start would trust.
- Loopback only by default; API-key near misses refused; size and count limits at their
  boundaries; prompts (and the API key) never in the log at the default level.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mistral_serve.v1 import generation_pb2 as pb
from mistral_serve.v1 import generation_pb2_grpc as pb_grpc
from tests.test_service_e2e import (REPO, ServerProcess, free_port, launch, request,
                                    start_server)

LONG = os.environ.get("MISTRAL_SERVE_LONG") == "1"
Code = grpc.StatusCode
API_KEY = "k3y-for-security-tests-5e1f"


def launch_on(ports: tuple[int, int], model_dir: Optional[Path], workdir: Path, *extra: str,
              env: Optional[dict] = None) -> ServerProcess:
    """launch() on fixed ports (the later --port / --metrics-port win in argparse)."""
    server = launch(model_dir, workdir, "--port", str(ports[0]), "--metrics-port",
                    str(ports[1]), *extra, env=env)
    server.port, server.metrics_port = ports
    return server


def wait_serving(server: ServerProcess, timeout: float = 120) -> float:
    """Seconds until health says SERVING; fails with the log if the process exits first."""
    t0 = time.monotonic()
    with server.sync_channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert server.proc.poll() is None, f"server exited:\n{server.log()}"
            assert time.monotonic() - t0 < timeout, f"not SERVING:\n{server.log()}"
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - t0
            except grpc.RpcError:
                pass
            time.sleep(0.02)


def greedy(server: ServerProcess, n: int = 8) -> list[int]:
    async def main():
        async with server.channel() as ch:
            out = await pb_grpc.GenerationStub(ch).Generate(request("Restart me", max_tokens=n))
            return list(out.token_ids)
    return asyncio.run(main())


# ---- restart safety ------------------------------------------------------------------------
def test_sigkill_mid_stream_then_restart_serves_at_once(tmp_path):
    """No --model: the demo model is written to the cache on the first start, reused after."""
    env = {"MISTRAL_SERVE_CACHE": str(tmp_path / "cache")}
    ports = (free_port(), free_port())
    first = launch_on(ports, None, tmp_path / "run1", env=env)
    wait_serving(first)
    before = greedy(first)

    async def killed_mid_stream():
        async with first.channel() as ch:
            call = pb_grpc.GenerationStub(ch).GenerateStream(request(max_tokens=8000),
                                                             timeout=60)
            await call.read()
            await call.read()
            first.proc.send_signal(signal.SIGKILL)
            try:
                while await call.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError as e:
                return e.code()
            return Code.OK

    code = asyncio.run(killed_mid_stream())
    assert first.proc.wait(10) == -signal.SIGKILL
    assert code == Code.UNAVAILABLE  # the client learns at once that the server went away

    second = launch_on(ports, None, tmp_path / "run2", env=env)  # same ports, same cache
    try:
        seconds = wait_serving(second)
        after = greedy(second)
    finally:
        assert second.stop() == 0, second.log()
    assert "creating the demo model" in first.log()
    assert "creating the demo model" not in second.log()  # the cached model was reused
    assert after == before
    print(f"\nrestart after SIGKILL: SERVING on the same ports in {seconds:.1f} s")
    assert seconds < 30


def test_server_killed_while_creating_the_demo_model_recovers(tmp_path):
    """SIGKILL the first start at random moments (model write or load); the next start
    still serves a checkpoint that loads, never a torn one."""
    env = {"MISTRAL_SERVE_CACHE": str(tmp_path / "cache")}
    rng = random.Random(7)
    phases = []
    for i in range(4 if LONG else 2):
        server = launch_on((free_port(), free_port()), None, tmp_path / f"kill{i}", env=env)
        deadline = time.monotonic() + 60
        marks = ("creating the demo", "loaded", "KV blocks of")
        while not any(m in server.log() for m in marks):
            assert time.monotonic() < deadline and server.proc.poll() is None, server.log()
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        log = server.log()
        phases.append("serving" if "KV blocks of" in log else "writing the model" if
                      "creating the demo model" in log else "loading" if "loaded" in log
                      else "starting")
    print(f"\nkilled first starts while: {phases}")
    server = launch_on((free_port(), free_port()), None, tmp_path / "final", env=env)
    try:
        wait_serving(server)
        assert len(greedy(server, 3)) == 3
    finally:
        assert server.stop() == 0, server.log()


_WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{repo!r}, {proto!r}]
    import engine.tokenizer as tok
    from engine.demo_model import ensure_demo_model

    if {die_before_rename!r}:
        real = tok.write_tokenizer_files
        def die(d, version):  # the weights and config.json are written, the rename is not
            real(d, version=version)
            os.kill(os.getpid(), signal.SIGKILL)
        tok.write_tokenizer_files = die
    print("writing", flush=True)
    ensure_demo_model({target!r}, layers=2, hidden=256, heads=4, kv_heads=2, intermediate=256)
""")


def _writer(target: Path, die_before_rename: bool) -> subprocess.Popen:
    code = _WRITER.format(repo=str(REPO), proto=str(REPO / "proto"), target=str(target),
                          die_before_rename=die_before_rename)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _trusted_and_loadable(target: Path) -> bool:
    """Whether a start would trust target (config.json there); if so, it must load."""
    from engine.weights import load_model

    if not (target / "config.json").is_file():
        return False
    model, args, _ = load_model(str(target))
    assert args.hidden_size == 256 and args.num_hidden_layers == 2
    return True


def test_killed_writer_leaves_no_half_written_model(tmp_path):
    from engine.demo_model import ensure_demo_model

    target = tmp_path / "cache" / "demo"
    proc = _writer(target, die_before_rename=True)
    assert proc.wait(120) == -signal.SIGKILL
    assert not target.exists()  # everything was in a hidden temporary directory
    leftovers = [p.name for p in target.parent.iterdir()]
    assert leftovers and all(name.startswith(".demo.tmp-") for name in leftovers), leftovers

    # Killed at random moments: the target is absent, or complete and loadable.
    rng = random.Random(3)
    outcomes = []
    for _ in range(12 if LONG else 4):
        t = tmp_path / f"random{len(outcomes)}" / "demo"
        proc = _writer(t, die_before_rename=False)
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(rng.uniform(0.2, 1.6))  # the write takes about a second here
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        outcomes.append(_trusted_and_loadable(t))
    print(f"\nkilled writers: {outcomes.count(True)} finished before the kill, "
          f"{outcomes.count(False)} left nothing trusted")

    # A later start writes the model afresh and uses it.
    assert ensure_demo_model(target, layers=2, hidden=256, heads=4, kv_heads=2,
                             intermediate=256) == target
    assert _trusted_and_loadable(target)


# ---- security ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secured(model_dir, tmp_path_factory):
    s = start_server(model_dir, tmp_path_factory.mktemp("secured"), "--api-key", API_KEY,
                     "--max-message-bytes", "65536", "--max-prompt-tokens", "64")
    yield s
    assert s.stop() == 0, s.log()


AUTH = [("authorization", f"Bearer {API_KEY}")]


def _listening(port: int) -> set[str]:
    """Local addresses with a socket in LISTEN on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(addr)
                # Each 32-bit word is in host (little-endian) order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if width == 8 else socket.AF_INET6
                found.add(socket.inet_ntop(family, raw))
    return found


def _non_loopback_ipv4() -> Optional[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))  # no packet is sent; picks the outbound interface
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def test_listens_on_loopback_only_by_default(secured):
    for port in (secured.port, secured.metrics_port):
        assert _listening(port) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, port
        assert _listening(port), f"nothing listens on {port}"
    ip = _non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    for port in (secured.port, secured.metrics_port):
        with socket.socket() as s:
            s.settimeout(3)
            with pytest.raises(OSError):  # refused: nothing listens there
                s.connect((ip, port))


def test_api_key_near_misses_are_refused(secured):
    near_misses = [f"Bearer {API_KEY[:-1]}", f"Bearer {API_KEY}x", f"Bearer {API_KEY.upper()}",
                   f"Basic {API_KEY}", "Bearer ", "Bearer", f"Bearer  {API_KEY[1:]}",
                   f"{API_KEY}"]

    async def main():
        async with secured.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            codes = []
            for value in near_misses:
                for call in (lambda md: stub.Generate(request(max_tokens=1), metadata=md),
                             lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md)):
                    try:
                        await call([("authorization", value)])
                        codes.append(Code.OK)
                    except grpc.aio.AioRpcError as e:
                        codes.append(e.code())
            # Two headers, one right: accepted (the right key is what matters).
            both = await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=[
                ("authorization", "Bearer wrong"), *AUTH])
            # Lower-case scheme and the key itself: fine.
            lower = await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=[
                ("authorization", f"bearer {API_KEY}")])
            return codes, both, lower

    codes, both, lower = asyncio.run(main())
    assert set(codes) == {Code.UNAUTHENTICATED} and len(codes) == 2 * len(near_misses)
    assert both.vocab_size == lower.vocab_size == 32768


def _code(coro) -> tuple[Code, str]:
    async def main():
        try:
            await coro()
            return Code.OK, ""
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
    return asyncio.run(main())


def test_limits_at_their_boundaries(secured):
    """Each limit: the largest allowed value passes, one more is refused with a message."""
    def gen(req: pb.GenerateRequest):
        async def call():
            async with secured.channel() as ch:
                return await pb_grpc.GenerationStub(ch).Generate(req, metadata=AUTH, timeout=30)
        return call

    def ids(n):
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * n), sampling=pb.SamplingParams(
            max_tokens=1, temperature=0))

    def with_sampling(**kw):
        return pb.GenerateRequest(prompt="limits", sampling=pb.SamplingParams(
            max_tokens=2, temperature=0, **kw))

    def with_id(n):
        r = with_sampling()
        r.request_id = "i" * n
        return r

    cases = [  # (name, allowed request, refused request, what the refusal says)
        ("prompt tokens (--max-prompt-tokens 64)", ids(64), ids(65), "at most 64"),
        ("stop strings", with_sampling(stop=[f"s{i}" for i in range(16)]),
         with_sampling(stop=[f"s{i}" for i in range(17)]), "at most 16 stop strings"),
        ("stop string length", with_sampling(stop=["x" * 256]), with_sampling(stop=["x" * 257]),
         "at most 256 characters"),
        ("logprobs", with_sampling(logprobs=20), with_sampling(logprobs=21), "logprobs must be <="),
        ("request id length", with_id(128), with_id(129), "at most 128"),
    ]
    for name, ok, refused, needle in cases:
        assert _code(gen(ok)) == (Code.OK, ""), name
        code, details = _code(gen(refused))
        assert code == Code.INVALID_ARGUMENT and needle in details, (name, code, details)

    # Messages over --max-message-bytes: refused by gRPC before any parsing or tokenizing.
    code, details = _code(gen(pb.GenerateRequest(prompt="word " * 14000)))
    assert code == Code.RESOURCE_EXHAUSTED, (code, details)
    # A reply that would be too large to send is an error, not a hung or dead call.
    big = with_sampling(logprobs=20)
    big.sampling.max_tokens = 600
    big.sampling.ignore_eos = True
    code, details = _code(gen(big))
    print(f"\n600 tokens x 20 logprobs over a 64 KiB message limit: {code.name} {details!r}")
    assert code in (Code.OK, Code.RESOURCE_EXHAUSTED), (code, details)
    assert _code(gen(with_sampling())) == (Code.OK, "")


def test_prompts_and_the_api_key_stay_out_of_the_log(secured):
    secret = "PROMPT-SECRET-7f3a"

    async def main():
        async with secured.channel() as ch:
            stub = pb_grpc.GenerationStub(ch)
            calls = [
                stub.Generate(request(f"{secret} plain prompt", max_tokens=3), metadata=AUTH),
                stub.Generate(pb.GenerateRequest(
                    chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user",
                                                                  content=f"{secret} chat")]),
                    sampling=pb.SamplingParams(max_tokens=3, stop=[f"{secret}-stop"])),
                    metadata=AUTH),
                stub.Tokenize(pb.TokenizeRequest(text=f"{secret} tokenize"), metadata=AUTH),
                # refused ones: bad role, too long, too big, no key, bad sampling
                stub.Generate(pb.GenerateRequest(chat=pb.ChatMessages(messages=[
                    pb.ChatMessage(role="robot", content=f"{secret} content")])),
                    metadata=AUTH),
                stub.Generate(request(f"{secret} " * 100, max_tokens=2), metadata=AUTH),
                stub.Generate(request(f"{secret} " * 5000, max_tokens=2), metadata=AUTH),
                stub.Generate(request(f"{secret} no key", max_tokens=2)),
                stub.Generate(request(f"{secret} bad temperature", max_tokens=2,
                                      temperature=-1.0), metadata=AUTH),
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            stream = stub.GenerateStream(request(f"{secret} cancelled", max_tokens=500),
                                         metadata=AUTH)
            await stream.read()
            stream.cancel()
            return results

    results = asyncio.run(main())
    codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else Code.OK for r in results]
    assert codes[:3] == [Code.OK] * 3 and Code.OK not in codes[3:], codes
    time.sleep(0.3)  # the cancelled call's log line
    log = secured.log()
    assert "rejected: INVALID_ARGUMENT" in log and "cancelled after" in log  # it did log them
    assert secret not in log
    assert API_KEY not in log
