"""Every error tpcluster raises, under one base class.

This module imports nothing from the package, so any layer may import it. Each class names the
gRPC status it stands for (`status`, a `grpc.StatusCode` name; the gateway maps it in one place,
and a test pins the table), so an error means the same to every client.

    ClusterError
    ├── ShardingError (ValueError)      a size does not divide by the TP degree
    ├── CheckpointError                 missing/unexpected keys, shape mismatch, unreadable file
    │   └── UnsupportedModel            a checkpoint's architecture or settings cannot be compiled
    ├── InputError (ValueError)         call-time inputs do not match the traced signature
    │   └── BucketError                 no bucket fits, or a kernel picked a bucket that does not exist
    ├── ArtifactError                   a saved model folder is truncated, tampered or from another version
    ├── BackendUnavailable              the requested backend cannot run on this machine
    ├── CapacityError                   the cluster cannot hold the rank group
    ├── RankError                       code running inside a rank raised (carries rank and traceback)
    │   └── RankFailure                 a rank died or stopped answering within its timeout
    ├── ClusterTimeout (TimeoutError)   a bounded wait ran out (rendezvous, call)
    ├── ModelNotFound (KeyError)        no model of that name is served
    ├── ModelUnavailable                the model has no ready replica right now
    │   └── CoordinatorLost             a replica's coordinator process died (reload it)
    ├── Overloaded                      the model's queue is full: retry later
    └── DraftUnavailable                a speculative generation's draft failed (the target is fine)
"""

from __future__ import annotations


class ClusterError(Exception):
    """Base class of every tpcluster error."""

    status = "INTERNAL"


class ShardingError(ClusterError, ValueError):
    """A layer's size does not split evenly across the tensor-parallel ranks."""

    status = "INVALID_ARGUMENT"


class CheckpointError(ClusterError):
    """A checkpoint does not fit the model (keys, shapes) or cannot be read."""

    status = "FAILED_PRECONDITION"


class UnsupportedModel(CheckpointError):
    """A checkpoint's architecture, task or configuration is one tpcluster cannot compile (the message
    names what is supported)."""

    status = "INVALID_ARGUMENT"


class InputError(ClusterError, ValueError):
    """Inputs given at call time do not match what the model was traced with."""

    status = "INVALID_ARGUMENT"


class BucketError(InputError):
    """No bucket can take the input, or the bucket kernel returned an invalid bucket."""

    status = "INVALID_ARGUMENT"


class ArtifactError(ClusterError):
    """A saved model folder cannot be loaded: names the file and the reason."""

    status = "FAILED_PRECONDITION"


class BackendUnavailable(ClusterError):
    """The requested tracing backend is not installed or has no device here."""

    status = "FAILED_PRECONDITION"


class CapacityError(ClusterError):
    """The cluster has too few NeuronCores (on one node) for the requested rank group."""

    status = "RESOURCE_EXHAUSTED"


class RankError(ClusterError):
    """Code running inside rank `rank` raised; `remote_traceback` is the rank's traceback."""

    status = "INTERNAL"

    def __init__(self, rank: int, message: str, remote_traceback: str = "") -> None:
        self.rank = rank
        self.message = message
        self.remote_traceback = remote_traceback
        text = f"rank {rank}: {message}"
        if remote_traceback:
            text += f"\n--- traceback from rank {rank} ---\n{remote_traceback.rstrip()}"
        super().__init__(text)

    def __reduce__(self):
        return (type(self), (self.rank, self.message, self.remote_traceback))


class RankFailure(RankError):
    """Rank `rank` died or stopped answering; the replica must be rebuilt before it serves again."""

    status = "UNAVAILABLE"


class ClusterTimeout(ClusterError, TimeoutError):
    """A bounded wait on the cluster ran out."""

    status = "DEADLINE_EXCEEDED"


class ModelNotFound(ClusterError, KeyError):
    """No model of that name is served here."""

    status = "NOT_FOUND"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "model not found"


class ModelUnavailable(ClusterError):
    """The model has no ready replica (ranks starting, lost, or rebuilding): retry shortly."""

    status = "UNAVAILABLE"


class CoordinatorLost(ModelUnavailable):
    """A replica's coordinator process died; whoever holds the model recreates it from the saved model."""

    status = "UNAVAILABLE"


class Overloaded(ClusterError):
    """The model's request queue is full: retry later, or raise the gateway's --max-queue."""

    status = "RESOURCE_EXHAUSTED"


class DraftUnavailable(ClusterError):
    """The draft model of a speculative generation failed (its replica is lost or rebuilding): the
    target is fine; retry, or generate without a draft."""

    status = "UNAVAILABLE"
