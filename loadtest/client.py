"""The benchmark's gRPC client: one coroutine per request, timing every streamed token.

TTFT is from sending the request to the first message that carries a token; E2EL is from
sending to the end of the stream. When the server merges several tokens into one message
(the client fell behind), the gap since the previous message is split evenly over them,
so a request always has output_tokens - 1 inter-token latencies summing to the decode time.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.datasets import BenchRequest
from mistral_serve.v1 import generation_pb2 as pb
from mistral_serve.v1 import generation_pb2_grpc as pb_grpc

_FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower()
                 for k, v in pb.FinishReason.items()}


class ServerUnreachable(RuntimeError):
    """The server did not answer, is not SERVING, or refused our credentials."""


@dataclass
class RequestRecord:
    """What one request measured. Times are seconds; start is from the benchmark start."""

    index: int
    request_id: str
    prompt_len: int  # what the dataset asked for
    output_len: int
    start: float = 0.0
    success: bool = False
    error: str = ""
    ttft: float = math.nan
    e2el: float = math.nan
    itl: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # from the benchmark start, per token
    streamed_tokens: int = 0  # token ids seen on the stream
    prompt_tokens: int = 0  # the server's usage on the final message
    output_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = ""

    @property
    def tpot(self) -> Optional[float]:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def end(self) -> float:
        """When the stream ended (or failed), from the benchmark start."""
        return self.start + (self.e2el if math.isfinite(self.e2el) else 0.0)


class ServeClient:
    """An asyncio gRPC channel to a mistral-serve server; use as `async with`."""

    def __init__(self, target: str, api_key: Optional[str] = None,
                 tls_ca: Optional[str] = None, tls_server_name: Optional[str] = None,
                 temperature: float = 0.0, request_timeout: Optional[float] = None):
        self.target = target
        self.temperature = temperature
        self.request_timeout = request_timeout
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        options = [("grpc.max_receive_message_length", 64 << 20)]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_ca is not None:
            try:
                root = Path(tls_ca).read_bytes()
            except OSError as e:
                raise ValueError(f"--tls-ca: cannot read {tls_ca!r}: {e.strerror}") from None
            if b"-----BEGIN CERTIFICATE-----" not in root:
                raise ValueError(f"--tls-ca {tls_ca!r} is not a PEM certificate")
            self.channel = grpc.aio.secure_channel(
                target, grpc.ssl_channel_credentials(root), options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options)
        self.stub = pb_grpc.GenerationStub(self.channel)

    async def __aenter__(self) -> "ServeClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout: float) -> pb.ModelInfo:
        """Wait up to timeout s for health SERVING; return ModelInfo, or raise ServerUnreachable."""
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        status = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=left,
                                             wait_for_ready=True)).status
            except grpc.aio.AioRpcError as e:
                if e.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.UNAVAILABLE):
                    raise ServerUnreachable(f"health check on {self.target} failed: "
                                            f"{e.code().name}: {e.details()}") from None
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    break
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                continue
            if status == health_pb2.HealthCheckResponse.SERVING:
                return await self._model_info()
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        if status is None:
            raise ServerUnreachable(
                f"no mistral-serve server answered at {self.target} within {timeout:g} s "
                f"(is `mistral-serve serve` running there? TLS on one side only?)")
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        raise ServerUnreachable(f"the server at {self.target} is {name} after {timeout:g} s "
                                f"(still loading the model, or shutting down)")

    async def _model_info(self) -> pb.ModelInfo:
        try:
            return await self.stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                metadata=self.metadata, timeout=30)
        except grpc.aio.AioRpcError as e:
            hint = " (pass --api-key)" if e.code() == grpc.StatusCode.UNAUTHENTICATED else ""
            raise ServerUnreachable(f"GetModelInfo on {self.target} failed: {e.code().name}: "
                                    f"{e.details()}{hint}") from None

    async def count_tokens(self, texts: list[str], add_bos: bool,
                           concurrency: int = 16) -> list[int]:
        """Token lengths of texts as the server's tokenizer counts them."""
        sem = asyncio.Semaphore(concurrency)

        async def one(text: str) -> int:
            if not text:
                return 0
            async with sem:
                r = await self.stub.Tokenize(pb.TokenizeRequest(text=text, add_bos=add_bos),
                                             metadata=self.metadata, timeout=60)
            return len(r.token_ids)

        return list(await asyncio.gather(*(one(t) for t in texts)))

    def grpc_request(self, req: BenchRequest, request_id: str) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(temperature=self.temperature, max_tokens=req.output_len,
                                     ignore_eos=req.ignore_eos)
        out = pb.GenerateRequest(request_id=request_id, sampling=sampling)
        if req.prompt_token_ids is not None:
            out.token_ids.ids.extend(req.prompt_token_ids)
        else:
            out.prompt = req.prompt
        return out

    async def generate(self, req: BenchRequest, index: int, request_id: str,
                       t0: float) -> RequestRecord:
        """Send one streaming request and time it; failures are recorded, never raised."""
        rec = RequestRecord(index, request_id, req.prompt_len, req.output_len)
        message = self.grpc_request(req, request_id)
        sent = time.perf_counter()
        rec.start = sent - t0
        last_token_at = None
        final = None
        try:
            call = self.stub.GenerateStream(message, metadata=self.metadata,
                                            timeout=self.request_timeout)
            async for msg in call:
                now = time.perf_counter()
                n = len(msg.token_ids)
                if n:
                    if last_token_at is None:
                        rec.ttft = now - sent
                        rec.itl.extend([0.0] * (n - 1))  # arrived together with the first
                    else:
                        rec.itl.extend([(now - last_token_at) / n] * n)
                    last_token_at = now
                    rec.token_times.extend([now - t0] * n)
                    rec.streamed_tokens += n
                if msg.finish_reason:
                    final = msg
            rec.e2el = time.perf_counter() - sent
        except grpc.aio.AioRpcError as e:
            rec.e2el = time.perf_counter() - sent  # when it failed (for the in-flight timeline)
            rec.error = f"{e.code().name}: {e.details()}"
            return rec
        if final is None:
            rec.error = "the stream ended without a final message (no finish_reason)"
            return rec
        rec.finish_reason = _FINISH_NAMES.get(final.finish_reason, str(final.finish_reason))
        rec.prompt_tokens = final.usage.prompt_tokens
        rec.output_tokens = final.usage.completion_tokens
        rec.cached_tokens = final.usage.cached_tokens
        if rec.output_tokens == 0:
            rec.error = f"finished ({rec.finish_reason}) without generating a token"
            return rec
        rec.success = True
        return rec
