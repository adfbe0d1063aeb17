"""API-key authentication: an interceptor that answers UNAUTHENTICATED without a valid key."""

from __future__ import annotations

import asyncio
import hmac

import grpc


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires "authorization: Bearer <key>" on every call except health checks."""

    def __init__(self, api_key: str, exempt_prefixes: tuple[str, ...] = ("/grpc.health.v1.",)):
        self._key = api_key.encode()
        self._exempt = exempt_prefixes

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key != "authorization":
                continue
            value = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            # compare_digest: the time taken must not tell how much of the key matched
            if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self._key):
                return True
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (handler is None or handler_call_details.method.startswith(self._exempt)
                or self._authorized(handler_call_details.invocation_metadata)):
            return handler
        return _denying(handler)


_DENIED = "missing or wrong API key: send metadata 'authorization: Bearer <key>'"
# A streaming client whose writes fail on a call the server already closed reports INTERNAL
# instead of our status; so take its requests first, within bounds.
_DENY_READ_SECONDS = 2.0
_DENY_READ_MESSAGES = 64


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""

    async def deny(request_or_iterator, context, streaming_request: bool):
        if streaming_request:
            try:
                await asyncio.wait_for(_read_some(request_or_iterator), _DENY_READ_SECONDS)
            except asyncio.TimeoutError:
                pass
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    async def unary_in_unary_out(request, context):
        await deny(request, context, False)

    async def unary_in_stream_out(request, context):
        await deny(request, context, False)
        yield  # never reached; makes this an async generator

    async def stream_in_unary_out(requests, context):
        await deny(requests, context, True)

    async def stream_in_stream_out(requests, context):
        await deny(requests, context, True)
        yield  # never reached

    codecs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_in_unary_out, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(unary_in_stream_out, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(stream_in_unary_out, **codecs)
    return grpc.stream_stream_rpc_method_handler(stream_in_stream_out, **codecs)


async def _read_some(requests) -> None:
    """Read until the client half-closes, at most _DENY_READ_MESSAGES messages."""
    n = 0
    async for _ in requests:
        n += 1
        if n >= _DENY_READ_MESSAGES:
            return
