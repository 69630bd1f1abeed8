"""What the registry's server interceptors share: each method's handler wrapped once.

:class:`WrappingInterceptor` asks a subclass to wrap a method's handler the first
time the method is called and hands out the same wrapped handler after that (gRPC's
generic handlers return the same handler object per method each time). The cache is
bounded: a server registers few methods, this is a safety bound.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

MAX_CACHED = 1024  # wrapped handlers kept

Behaviour = Callable[..., Any]
Factory = Callable[..., grpc.RpcMethodHandler]


def handler_parts(handler: grpc.RpcMethodHandler) -> tuple[Factory, Behaviour]:
    """The factory that builds a handler of this one's kind, and its behaviour."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler, handler.unary_unary
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler, handler.unary_stream
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler, handler.stream_unary
    return grpc.stream_stream_rpc_method_handler, handler.stream_stream


class WrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A server interceptor that wraps each method's handler once; subclasses :meth:`_wrap`."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        if len(self._wrapped) < MAX_CACHED or method in self._wrapped:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError
