"""When the client retries a failed call, and how long it waits first.

The policy follows gRPC's retry design (A6): exponential backoff with full jitter (each wait drawn
from [0, backoff]), a multiplier, a cap on one wait, and a set of retryable status codes; the
difference is that attempts are bounded by the call's deadline rather than by a small fixed count,
so a default client rides out a replica rebuild that ends before its deadline.

A server that never answered is another matter: a refused connection (nothing listens at the
address, or the name does not resolve) is retried only for `unreachable_s` (2 s by default) by a
client that has not yet reached the gateway, then reported as such; a client that has reached it
before rides out a restart until the deadline like any UNAVAILABLE.

Only codes that say "nothing was done, try again" may be retried: UNAVAILABLE (no ready replica,
ranks lost, gateway restarting) and, if asked for, RESOURCE_EXHAUSTED. The latter is off by
default because the gateway also sends it for requests that will never fit (too many texts or
tensor elements, a message over the size limit), which retrying would only repeat until the
deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one call: the wait before retry n is uniform in [0, min(max_backoff_s,
    initial_backoff_s * multiplier**n)], and no retry starts that could not begin before the
    call's deadline. `max_retries` None means as many as the deadline allows; 0 turns retries off.
    `unreachable_s`: how long a client that has never reached the server retries a connection that
    fails (None: until the deadline)."""

    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    max_retries: int | None = None
    retryable_codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})
    unreachable_s: float | None = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(f"RetryPolicy needs 0 < initial_backoff_s <= max_backoff_s, got "
                             f"{self.initial_backoff_s} and {self.max_backoff_s}")
        if self.multiplier < 1:
            raise ValueError(f"RetryPolicy.multiplier must be >= 1 (backoff never shrinks), got {self.multiplier}")
        if self.max_retries is not None and self.max_retries < 0:
            raise ValueError(f"RetryPolicy.max_retries must be >= 0 or None (until the deadline), got {self.max_retries}")
        if self.unreachable_s is not None and not self.unreachable_s >= 0:
            raise ValueError(f"RetryPolicy.unreachable_s must be >= 0 or None (until the deadline), got {self.unreachable_s}")
        if isinstance(self.retryable_codes, grpc.StatusCode):
            raise TypeError(f"RetryPolicy.retryable_codes is a set of codes: pass frozenset({{{self.retryable_codes}}})")
        codes = frozenset(self.retryable_codes)
        if not all(isinstance(c, grpc.StatusCode) for c in codes):
            raise TypeError(f"RetryPolicy.retryable_codes must be grpc.StatusCode values, got {sorted(map(str, codes))}")
        if codes - RETRYABLE:
            refused = sorted(c.name for c in codes - RETRYABLE)
            raise ValueError(f"RetryPolicy cannot retry {refused}: those statuses mean the request itself failed or "
                             f"ran out of time; retry only {sorted(c.name for c in RETRYABLE)}")
        object.__setattr__(self, "retryable_codes", codes)

    def backoff(self, retry: int) -> float:
        """The ceiling of the wait before retry number `retry` (0 for the first retry)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** min(retry, 64))

    def next_delay(self, code: grpc.StatusCode, retry: int, remaining_s: float, rng: random.Random) -> float | None:
        """Seconds to wait before retry number `retry` of a call that failed with `code` and has
        `remaining_s` left before its deadline; None when it must not be retried."""
        if code not in self.retryable_codes or (self.max_retries is not None and retry >= self.max_retries):
            return None
        delay = rng.uniform(0.0, self.backoff(retry))
        return delay if delay < remaining_s else None


__all__ = ["RETRYABLE", "RetryPolicy"]
