"""Errors the tpcluster client raises, one per gRPC status the gateway uses.

    TpClusterError            (base; .code is the grpc.StatusCode, .details the server's message)
    ├── NotFound              no such model
    ├── InvalidArgument       bad shapes, empty text, too-long input, bad sampling parameters
    ├── ResourceExhausted     the model's queue is full, the payload is too large, or no capacity
    ├── FailedPrecondition    the model folder or checkpoint cannot be used as it is (fix it, then retry)
    ├── Unavailable           no ready replica, ranks lost; retried until the deadline (clients.retry)
    ├── DeadlineExceeded      the call's deadline passed
    ├── Unauthenticated       missing or wrong bearer token
    ├── Cancelled             the call was cancelled
    └── InternalError         anything else
"""

from __future__ import annotations

import grpc


class TpClusterError(Exception):
    code = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code


class NotFound(TpClusterError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(TpClusterError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(TpClusterError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(TpClusterError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(TpClusterError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TpClusterError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(TpClusterError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Cancelled(TpClusterError):
    code = grpc.StatusCode.CANCELLED


class InternalError(TpClusterError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (NotFound, InvalidArgument, ResourceExhausted, FailedPrecondition, Unavailable,
                                      DeadlineExceeded, Unauthenticated, Cancelled, InternalError)}


def from_rpc_error(exc: grpc.RpcError) -> TpClusterError:
    """The one place gRPC errors become ours."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return _BY_CODE.get(code, TpClusterError)(details or code.name, code)
