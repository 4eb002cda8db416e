"""One meaning per error: every ClusterError subclass names its gRPC status, the gateway maps it in
one place, and the client raises the matching class."""

import asyncio

import grpc
import pytest

from actors.gateway.server import _status_of
from clients import errors as client_errors
from cluster import errors

# The table users rely on: changing a row changes what clients see.
STATUS = {
    "ClusterError": "INTERNAL",
    "ShardingError": "INVALID_ARGUMENT",
    "CheckpointError": "FAILED_PRECONDITION",
    "UnsupportedModel": "INVALID_ARGUMENT",
    "InputError": "INVALID_ARGUMENT",
    "BucketError": "INVALID_ARGUMENT",
    "ArtifactError": "FAILED_PRECONDITION",
    "BackendUnavailable": "FAILED_PRECONDITION",
    "CapacityError": "RESOURCE_EXHAUSTED",
    "RankError": "INTERNAL",
    "RankFailure": "UNAVAILABLE",
    "ClusterTimeout": "DEADLINE_EXCEEDED",
    "ModelNotFound": "NOT_FOUND",
    "ModelUnavailable": "UNAVAILABLE",
    "CoordinatorLost": "UNAVAILABLE",
    "Overloaded": "RESOURCE_EXHAUSTED",
    "DraftUnavailable": "UNAVAILABLE",
}


# The client's class for each status the gateway sends.
CLIENT = {
    "INTERNAL": client_errors.InternalError,
    "INVALID_ARGUMENT": client_errors.InvalidArgument,
    "FAILED_PRECONDITION": client_errors.FailedPrecondition,
    "RESOURCE_EXHAUSTED": client_errors.ResourceExhausted,
    "UNAVAILABLE": client_errors.Unavailable,
    "DEADLINE_EXCEEDED": client_errors.DeadlineExceeded,
    "NOT_FOUND": client_errors.NotFound,
}


def _tree(cls):
    yield cls
    for sub in cls.__subclasses__():
        yield from _tree(sub)


def _instance(cls):
    return cls(0, "boom") if issubclass(cls, errors.RankError) else cls("boom")


def test_every_error_class_declares_its_status_and_the_table_is_pinned():
    classes = [c for c in _tree(errors.ClusterError) if c.__module__ == errors.__name__]
    assert all("status" in vars(c) for c in classes), [c.__name__ for c in classes if "status" not in vars(c)]
    assert {c.__name__: c.status for c in classes} == STATUS


@pytest.mark.parametrize("name", sorted(STATUS))
def test_the_gateway_sends_the_declared_status_and_the_client_raises_its_class(name):
    exc = _instance(getattr(errors, name))
    code, message = _status_of(exc)
    assert code == grpc.StatusCode[STATUS[name]]
    assert "boom" in message

    class Rpc(grpc.RpcError):
        def code(self):
            return code

        def details(self):
            return message

    raised = client_errors.from_rpc_error(Rpc())
    assert type(raised) is CLIENT[STATUS[name]] and raised.details == message


def test_a_timeout_is_deadline_exceeded_wherever_it_happened():
    assert _status_of(asyncio.TimeoutError())[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _status_of(errors.ClusterTimeout("coordinator forward did not answer"))[0] == grpc.StatusCode.DEADLINE_EXCEEDED


def test_anything_else_is_internal_without_leaking_its_message():
    code, message = _status_of(KeyError("secret path"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message and "KeyError" in message
