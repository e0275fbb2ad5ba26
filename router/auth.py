"""ApiKeyInterceptor: `authorization: Bearer <key>` on every call except health checks."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health

# Load balancers and orchestrators probe health without credentials.
_OPEN_PREFIXES = (f"/{health.SERVICE_NAME}/",)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_keys: tuple[str, ...]) -> None:
        if not api_keys:
            raise ValueError("ApiKeyInterceptor needs at least one API key")
        self._keys = [k.encode() for k in api_keys]

    def authorized(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(value, str) or not value.startswith("Bearer "):
            return False
        presented = value[len("Bearer "):].strip().encode()
        # Compare with every key, without stopping early, so timing reveals nothing.
        matches = [hmac.compare_digest(presented, key) for key in self._keys]
        return any(matches)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_OPEN_PREFIXES):
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only answers UNAUTHENTICATED."""

    async def deny(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong API key: send metadata 'authorization: Bearer <key>'")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
