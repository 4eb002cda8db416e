"""CoordinatorConfig: every bound on a replica's waits. No torch here: the gateway, batch jobs and the
handle's Protocol (cluster.handle) read it without importing the coordinator."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.backoff import Backoff

RANK_CALLS = ("auto", "graph", "actor")


@dataclass(frozen=True)
class CoordinatorConfig:
    """Every bound on a replica's waits, in one place (the gateway and batch jobs read them too)."""

    call_timeout_s: float = 120.0  # one serving call on the ranks (a forward, a generation step)
    trace_timeout_s: float = 1800.0  # build, trace, load, export (Neuron compilation takes minutes)
    rendezvous_timeout_s: float = 60.0  # forming the collective group, and every collective
    health_timeout_s: float = 10.0  # a health check or status call on the ranks
    placement_timeout_s: float = 30.0  # NeuronCores for the ranks: else CapacityError, never a pending actor
    close_timeout_s: float = 10.0  # a coordinator's orderly close, before it is killed
    threads_per_rank: int = 0  # 0: this node's CPUs divided among the ranks
    # How the per-step calls reach the ranks (actors.rank_group): "graph" (a Ray Compiled Graph),
    # "actor" (ordinary actor calls), "auto" (actor calls on the cpu backend, the graph otherwise).
    rank_calls: str = "auto"
    # Hot spare rank processes per replica, started beside its ranks, each holding a NeuronCore of its
    # own: a rank lost takes a spare's process, already started, instead of starting one (the spare is
    # then replaced in the background). Used where the backend keeps the surviving ranks (cpu, eager).
    spare_ranks: int = 0
    # cpu backend: compile every bucket graph to machine code (AOTInductor, cluster.trace.compiled) when the
    # replica loads, where no package is cached for it yet (9-25 s a graph, once per machine; needs g++).
    # A cached package is used whether or not this is set.
    compile_graphs: bool = False
    verify_tolerance: float = 1e-4
    rebuild_backoff: Backoff = Backoff()  # between attempts to rebuild a lost replica

    def __post_init__(self) -> None:
        for name in ("call_timeout_s", "trace_timeout_s", "rendezvous_timeout_s", "health_timeout_s",
                     "placement_timeout_s", "close_timeout_s", "verify_tolerance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CoordinatorConfig.{name} must be positive")
        if self.spare_ranks < 0:
            raise ValueError(f"CoordinatorConfig.spare_ranks must be 0 or more, got {self.spare_ranks}")
        if self.rank_calls not in RANK_CALLS:
            raise ValueError(f"CoordinatorConfig.rank_calls must be one of {RANK_CALLS}, got {self.rank_calls!r}")


__all__ = ["RANK_CALLS", "CoordinatorConfig"]
