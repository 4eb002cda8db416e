"""Delays between retries of something that may come back (capacity, a lost process): one helper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Backoff:
    """Exponential delays: `initial_s`, doubling each time, never above `max_s`."""

    initial_s: float = 1.0
    max_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"Backoff needs 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}")

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        while True:
            yield delay
            delay = min(delay * 2, self.max_s)
