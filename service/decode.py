"""Request bytes that do not parse as the method's message get INVALID_ARGUMENT.

Left to itself, grpc.aio answers them UNKNOWN ("Unexpected DecodeError") and logs a traceback
at ERROR level for every such call, so any client could flood the log. This interceptor
makes the deserializer return a marker instead of raising, and the handler refuse it.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import grpc

log = logging.getLogger(__name__)


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    def __init__(self, error: Exception):
        self.error = error


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps unary-request handlers (every RPC of ours and health's) as described above."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # streaming requests (reflection) keep gRPC's own handling
        return _tolerant(handler, handler_call_details.method)


def _tolerant(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as e:  # noqa: BLE001 - DecodeError, or whatever a codec raises
            return _Undecodable(e)

    async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
        log.info("%s rejected: INVALID_ARGUMENT: undecodable request (%s)", method,
                 type(request.error).__name__)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the request bytes are not a valid message for {method}")

    def unary(behavior: Callable) -> Callable:
        async def run(request, context):
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            return await behavior(request, context)
        return run

    def streaming(behavior: Callable) -> Callable:
        async def run(request, context):
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            async for response in behavior(request, context):
                yield response
        return run

    behavior = handler.unary_unary or handler.unary_stream
    if inspect.isasyncgenfunction(behavior):  # a stream written by yielding
        wrapped = streaming(behavior)
    elif inspect.iscoroutinefunction(behavior):  # a unary call, or a stream written by write()
        wrapped = unary(behavior)
    else:
        return handler  # a plain function runs in gRPC's thread pool: left as it is
    codecs = dict(request_deserializer=deserialize,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrapped, **codecs)
    return grpc.unary_stream_rpc_method_handler(wrapped, **codecs)
