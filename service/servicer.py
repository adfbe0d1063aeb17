"""mistral_serve.v1.Generation: validate, tokenize, stream engine outputs, map errors to codes.

Handlers run on one asyncio loop and never touch MLX: they hand requests to the EngineLoop
thread and get RequestOutputs back through a per-call asyncio.Queue. The engine thread hands
over each step's outputs in ONE call_soon_threadsafe (the servicer's output sink), stamped
once, so the event loop wakes once per step rather than once per request.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

import grpc

from engine.engine import EngineInfo
from engine.tokenizer import Tokenizer
from engine.loop import EngineDeadError, EngineLoop, QueueFullError
from mistral_serve.v1 import generation_pb2 as pb
from mistral_serve.v1 import generation_pb2_grpc as pb_grpc
from scheduler.output import RequestOutput
from scheduler.request import FinishReason, SamplingParams, ValidationError
from service.config import ServerConfig
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # mistral_serve.v1.Generation
CHAT_ROLES = ("system", "user", "assistant")
_FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
_INLINE_TOKENIZE_CHARS = 4096  # longer texts are tokenized off the event loop


class Unavailable(RuntimeError):
    """The server cannot take requests now: the model is loading or the server is draining."""


class RequestFailed(RuntimeError):
    """The engine failed this request (a fault on the server side)."""


class RequestCancelled(RuntimeError):
    """The server cancelled the request (it is shutting down)."""


# The ONE place exceptions become status codes. Deadlines and client cancellations need no
# entry: gRPC itself answers DEADLINE_EXCEEDED / CANCELLED, and _call_done aborts the request.
_STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineDeadError, grpc.StatusCode.UNAVAILABLE),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (RequestCancelled, grpc.StatusCode.CANCELLED),
    (RequestFailed, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised by a handler."""
    for exc_type, code in _STATUS_CODES:
        if isinstance(exc, exc_type):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def _map_errors(method: Callable) -> Callable:
    """Wrap a unary or server-streaming handler so exceptions end the call via status_for."""

    async def fail(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, grpc.aio.AbortError):  # already aborted with a status
            raise exc
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed", method.__name__, exc_info=exc)
        else:
            log.info("%s rejected: %s: %s", method.__name__, code.name, message)
        await context.abort(code, message)

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as e:  # noqa: BLE001 - every error becomes a status
                await fail(context, e)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as e:  # noqa: BLE001
            await fail(context, e)
    return unary


@dataclass(eq=False)
class _Call:
    """One generation call in flight: its output queue and what its log line and metrics need."""

    request_id: str
    num_prompt_tokens: int
    arrival: float
    engine_loop: EngineLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    last: Optional[RequestOutput] = None  # the finished output, once it came

    def deliver(self, stamp: float, out: RequestOutput) -> None:
        """On the event loop: queue an output stamped when the engine produced it."""
        self.queue.put_nowait((stamp, out))


class _OutputCallback:
    """A call's EngineLoop callback. Called on the engine thread it hops to the event loop
    itself (one wake-up per output); the servicer's sink instead delivers whole steps."""

    __slots__ = ("call", "aio_loop")

    def __init__(self, call: _Call, aio_loop: asyncio.AbstractEventLoop):
        self.call = call
        self.aio_loop = aio_loop

    def __call__(self, out: RequestOutput) -> None:
        try:
            self.aio_loop.call_soon_threadsafe(self.call.deliver, time.monotonic(), out)
        except RuntimeError:  # the event loop closed during shutdown
            pass


class GenerationServicer(pb_grpc.GenerationServicer):
    """mistral_serve.v1.Generation over an EngineLoop attached once the model has loaded."""

    def __init__(self, config: ServerConfig, metrics: ServiceMetrics):
        self.config = config
        self.metrics = metrics
        self.info: Optional[EngineInfo] = None
        self.tokenizer: Optional[Tokenizer] = None
        self.engine_loop: Optional[EngineLoop] = None
        self.draining = False
        self._calls: dict[str, _Call] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def attach(self, info: EngineInfo, tokenizer: Tokenizer, engine_loop: EngineLoop) -> None:
        """Serve with this engine (an EngineLoop, or an EngineProcess with the same API);
        called on the event loop, before any request."""
        self.info, self.tokenizer, self.engine_loop = info, tokenizer, engine_loop
        try:
            aio_loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test wiring things by hand): per-output hand-over
            return

        def sink(pairs: list[tuple[Callable, RequestOutput]]) -> None:  # on the engine thread
            try:
                aio_loop.call_soon_threadsafe(_dispatch, time.monotonic(), pairs)
            except RuntimeError:  # the event loop closed during shutdown
                pass

        engine_loop.set_output_sink(sink)

    @property
    def num_calls(self) -> int:
        return len(self._calls)

    async def wait_idle(self) -> None:
        """Return once no generation call is in flight."""
        await self._idle.wait()

    # ---- RPCs ------------------------------------------------------------------------------
    @_map_errors
    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[
                                 pb.GenerateStreamResponse]:
        async for response in self._generate(request, context):
            yield response

    @_map_errors
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        result = pb.GenerateResponse()
        text = []
        async for chunk in self._generate(request, context):
            result.request_id = chunk.request_id
            result.token_ids.extend(chunk.token_ids)
            result.logprobs.extend(chunk.logprobs)
            text.append(chunk.text)
            if chunk.finish_reason:
                result.finish_reason = chunk.finish_reason
                result.usage.CopyFrom(chunk.usage)
        result.text = "".join(text)
        return result

    @_map_errors
    async def Tokenize(self, request: pb.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        self._ready()
        which = request.WhichOneof("input")
        if which is None:
            raise ValidationError("the request has no input: set text or chat")
        add_bos = request.add_bos if request.HasField("add_bos") else True
        if which == "text":
            ids = await self._encode_text(request.text, add_bos, what="text")
        else:
            ids = self._encode_chat(request.chat)
        return pb.TokenizeResponse(token_ids=ids, pieces=token_pieces(self.tokenizer, ids))

    @_map_errors
    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        info = self._ready()[0]
        return model_info(info, self.tokenizer, self.metrics.model_name)

    # ---- generation ------------------------------------------------------------------------
    async def _generate(self, request: pb.GenerateRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[
                            pb.GenerateStreamResponse]:
        arrival = time.monotonic()
        engine_loop = self._ready()[1]
        request_id = self._request_id(request.request_id)
        params = sampling_params(request.sampling, self.config)
        prompt_ids = await self._prompt_ids(request)
        if log.isEnabledFor(logging.DEBUG):  # prompts stay out of logs at the default level
            log.debug("request %s prompt %r", request_id, _describe_input(request))

        call = _Call(request_id, len(prompt_ids), arrival, engine_loop)
        on_output = _OutputCallback(call, asyncio.get_running_loop())
        if request_id in self._calls:
            raise ValidationError(f"request_id {request_id!r} is already in use by a running "
                                  f"request; use a unique id or leave it empty")
        engine_loop.submit(request_id, prompt_ids, params, on_output, priority=request.priority)
        self._calls[request_id] = call
        self._idle.clear()
        # Runs however the call ends (finished, client cancel, deadline, server stop): an
        # unfinished request is aborted at once so its KV blocks go back to the pool.
        context.add_done_callback(lambda ctx: self._call_done(call, ctx))

        interval = self.config.stream_interval
        while True:
            batch = [await call.queue.get()]
            tokens = len(batch[0][1].new_token_ids)
            # After the first token, wait for stream_interval tokens per message; and when
            # the client fell behind, merge whatever is queued.
            while not batch[-1][1].finished and (
                    not call.queue.empty() or
                    (call.first_token_time is not None and tokens < interval)):
                batch.append(await call.queue.get())  # no wait when something is queued
                tokens += len(batch[-1][1].new_token_ids)
            response = self._response(call, batch)
            yield response
            last = batch[-1][1]
            if last.finished:
                if last.finish_reason == FinishReason.ERROR:
                    raise RequestFailed(f"generation failed: {last.error or 'engine error'}")
                if last.finish_reason == FinishReason.CANCELLED:
                    raise RequestCancelled("the server cancelled the request (shutting down)")
                return

    def _response(self, call: _Call, batch: list[tuple[float, RequestOutput]]
                  ) -> pb.GenerateStreamResponse:
        # Built in one constructor call: it runs once per token per request.
        ids, texts = [], []
        for stamp, out in batch:
            self._observe(call, stamp, out)
            ids.extend(out.new_token_ids)
            texts.append(out.new_text)
        response = pb.GenerateStreamResponse(request_id=call.request_id, token_ids=ids,
                                             text="".join(texts))
        for _, out in batch:
            for lp in out.logprobs:
                response.logprobs.append(pb.TokenLogprob(
                    token_id=lp.token_id, logprob=lp.logprob,
                    top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top_logprobs]))
        out = batch[-1][1]  # only the last output of a batch can be the finished one
        if out.finished:
            response.finish_reason = _FINISH_REASONS.get(out.finish_reason,
                                                         pb.FINISH_REASON_UNSPECIFIED)
            response.usage.prompt_tokens = out.num_prompt_tokens or call.num_prompt_tokens
            response.usage.completion_tokens = out.num_output_tokens
            response.usage.cached_tokens = out.num_cached_tokens
        return response

    def _observe(self, call: _Call, stamp: float, out: RequestOutput) -> None:
        m = self.metrics
        if out.queue_time is not None:
            m.request_queue_time.observe(out.queue_time)
        n = len(out.new_token_ids)
        if n:
            if call.first_token_time is None:
                call.first_token_time = stamp
                m.time_to_first_token.observe(stamp - call.arrival)
                m.prompt_tokens.inc(call.num_prompt_tokens)
            else:
                m.inter_token_latency.observe((stamp - call.last_token_time) / n)
            call.last_token_time = stamp
            m.generation_tokens.inc(n)
        if out.finished:
            call.last = out
            m.e2e_request_latency.observe(stamp - call.arrival)
            m.request_finished(out.finish_reason.value if out.finish_reason else "unknown")

    def _call_done(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        self._calls.pop(call.request_id, None)
        if not self._calls:
            self._idle.set()
        latency = time.monotonic() - call.arrival
        out = call.last
        if out is None:  # the client went away, the deadline passed or the server stopped
            call.engine_loop.abort(call.request_id)
            remaining = context.time_remaining()
            timed_out = remaining is not None and remaining <= 0
            reason = "deadline_exceeded" if timed_out else "cancelled"
            self.metrics.e2e_request_latency.observe(latency)
            self.metrics.request_finished("cancelled")
            log.info("request %s: %s after %.3f s (%d prompt tokens)", call.request_id, reason,
                     latency, call.num_prompt_tokens)
            return
        ttft = (call.first_token_time - call.arrival) if call.first_token_time else float("nan")
        log.info("request %s: %d prompt (%d cached) + %d output tokens, %s, %.3f s, "
                 "ttft %.3f s", call.request_id, out.num_prompt_tokens or call.num_prompt_tokens,
                 out.num_cached_tokens, out.num_output_tokens,
                 out.finish_reason.value if out.finish_reason else "?", latency, ttft)

    # ---- input -----------------------------------------------------------------------------
    def _ready(self) -> tuple[EngineInfo, EngineLoop]:
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        if self.info is None or self.engine_loop is None:
            raise Unavailable("the model is still loading; retry when health reports SERVING")
        if not self.engine_loop.is_alive:
            raise EngineDeadError("the engine has stopped; the server must be restarted")
        return self.info, self.engine_loop

    def _request_id(self, request_id: str) -> str:
        if not request_id:
            return uuid.uuid4().hex
        limit = self.config.max_request_id_chars
        if len(request_id) > limit:
            raise ValidationError(f"request_id is {len(request_id)} characters; at most {limit}")
        if not request_id.isprintable():
            raise ValidationError("request_id must be printable text (no control characters)")
        return request_id

    async def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        which = request.WhichOneof("input")
        if which is None:
            raise ValidationError("the request has no input: set prompt, chat or token_ids")
        if which == "prompt":
            add_bos = request.add_bos if request.HasField("add_bos") else True
            ids = await self._encode_text(request.prompt, add_bos, what="prompt")
        elif which == "chat":
            ids = self._encode_chat(request.chat)
        else:
            ids = list(request.token_ids.ids)
            if not ids:
                raise ValidationError("token_ids is empty; send at least one token id")
        limit = self.config.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise ValidationError(f"the prompt has {len(ids)} tokens; this server takes at most "
                                  f"{limit}")
        return ids

    async def _encode_text(self, text: str, add_bos: bool, what: str) -> list[int]:
        if not text:
            raise ValidationError(f"{what} is empty")
        tokenizer = self.tokenizer
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return list(tokenizer.encode(text, add_bos=add_bos))
        return list(await asyncio.to_thread(tokenizer.encode, text, add_bos=add_bos))

    def _encode_chat(self, chat: pb.ChatMessages) -> list[int]:
        if not chat.messages:
            raise ValidationError("chat has no messages")
        for i, m in enumerate(chat.messages):
            if m.role not in CHAT_ROLES:
                # Clipped: a huge role echoed back would overflow gRPC's status trailer and
                # flood the log with user text.
                role = m.role if len(m.role) <= 32 else m.role[:32] + "..."
                raise ValidationError(f"chat message {i} has role {role!r}; expected one of "
                                      f"{', '.join(CHAT_ROLES)}")
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]
        try:
            return list(self.tokenizer.encode_chat(messages))
        except ValidationError:
            raise
        except ValueError as e:  # the Instruct format rejects this conversation's shape
            raise ValidationError(f"chat: {e}") from e


def _dispatch(stamp: float, pairs: list[tuple[Callable, RequestOutput]]) -> None:
    """On the event loop: hand one engine step's outputs to their calls, in order."""
    for cb, out in pairs:
        if type(cb) is _OutputCallback:
            cb.call.deliver(stamp, out)
        else:  # not one of ours: callbacks are thread-safe, so calling it here is fine
            try:
                cb(out)
            except Exception:  # noqa: BLE001 - one broken consumer must not starve the rest
                log.exception("output callback failed for %s", out.request_id)


def sampling_params(sp: pb.SamplingParams, config: ServerConfig) -> SamplingParams:
    """Convert the proto message; SamplingParams.__post_init__ checks ranges and NaN."""
    max_tokens = sp.max_tokens if sp.HasField("max_tokens") else config.default_max_tokens
    if max_tokens > config.max_tokens_cap:
        raise ValidationError(f"max_tokens must be <= {config.max_tokens_cap} on this server, "
                              f"got {max_tokens}")
    too_long = next((s for s in sp.stop if len(s) > config.max_stop_string_chars), None)
    if too_long is not None:
        raise ValidationError(f"stop strings must be at most {config.max_stop_string_chars} "
                              f"characters, got one of {len(too_long)}")
    return SamplingParams(
        temperature=sp.temperature if sp.HasField("temperature") else 1.0,
        top_p=sp.top_p if sp.HasField("top_p") else 1.0,
        top_k=sp.top_k,
        min_p=sp.min_p,
        repetition_penalty=(sp.repetition_penalty if sp.HasField("repetition_penalty")
                            else 1.0),
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        seed=sp.seed if sp.HasField("seed") else None,
        max_tokens=max_tokens,
        stop=tuple(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs if sp.HasField("logprobs") else 0,
        return_logprobs=sp.HasField("logprobs"),
    )


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's vocabulary piece ("▁Hello", "<0x0A>", "[INST]")."""
    return [tokenizer.id_to_piece(i) for i in ids]


def model_info(engine: EngineInfo, tokenizer: Tokenizer, model_name: str) -> pb.ModelInfo:
    """ModelInfo from the loaded engine."""
    a = engine.model_args
    quant = a.quantization or {}
    info = pb.ModelInfo(
        model_name=model_name, model_path=str(engine.model_path or ""),
        vocab_size=a.vocab_size, hidden_size=a.hidden_size,
        num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim,
        intermediate_size=a.intermediate_size, rope_theta=a.rope_theta,
        dtype=engine.dtype,
        quantization_bits=quant.get("bits") or 0,
        quantization_group_size=quant.get("group_size", 64) if quant else 0,
        block_size=engine.config.block_size, kv_blocks_total=engine.num_kv_blocks,
        max_num_seqs=engine.config.max_num_seqs,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if a.sliding_window:
        info.sliding_window = a.sliding_window
    if engine.max_model_len:
        info.max_model_len = engine.max_model_len
    return info


def _describe_input(request: pb.GenerateRequest) -> str:
    which = request.WhichOneof("input")
    if which == "prompt":
        return request.prompt[:500]
    if which == "chat":
        return " | ".join(f"{m.role}: {m.content[:200]}" for m in request.chat.messages)
    return f"{len(request.token_ids.ids)} token ids"
