"""Generation rounds run back to back in the coordinator, streamed to their consumer.

A consumer (a gateway's replica scheduler, a library `GenerationStream`) does not ask for each
step: it opens a stream, and the coordinator runs round after round (`Coordinator.generate_batch`:
close, admit, one step, take) while the stream has work, handing each round's result over as it
is made. New requests and cancellations reach a running stream through `admit`, into the
stream's own inbox, and are taken at its next round; the round reports each admission under the
tag the consumer gave it. So the consumer's hop is off the per-token path: the next step starts as
soon as the last one ends.

A stream ends when its consumer holds no open session and sent nothing for `idle_s`; the
consumer starts a new one when it has work again (what it admitted in between waits in its
inbox). Several streams may run on one coordinator (a gateway's, a library caller's): each round
steps the whole batch and takes only the stream's own sessions' tokens; rounds of different
streams never overlap (one lock, also held by every other call to the coordinator).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Sequence

from cluster.generation.types import GenerationRound

#: a stream with nothing to do waits this long for new work before it ends
IDLE_S = 0.5


@dataclass
class _Inbox:
    opens: list[tuple[Hashable, Any, Any]] = field(default_factory=list)  # (tag, request, draft)
    closes: list[int] = field(default_factory=list)


class RoundStreams:
    """The round streams of one coordinator. `lock` serialises every call to the coordinator."""

    def __init__(self, generate_batch: Callable[..., GenerationRound], has_work: Callable[[], bool],
                 lock: threading.RLock | None = None, idle_s: float = IDLE_S) -> None:
        self._generate_batch = generate_batch
        self._has_work = has_work
        self.lock = lock or threading.RLock()
        self._arrived = threading.Condition(self.lock)
        self._inboxes: dict[Hashable, _Inbox] = {}
        self.idle_s = idle_s

    def admit(self, stream: Hashable, opens: Sequence[tuple[Hashable, Any, Any]] = (), closes: Sequence[int] = ()) -> None:
        """Queue admissions (tag, request, draft) and closes for `stream`'s next round."""
        with self.lock:
            inbox = self._inboxes.setdefault(stream, _Inbox())
            inbox.opens.extend(opens)
            inbox.closes.extend(closes)
            self._arrived.notify_all()

    def rounds(self, stream: Hashable, opens: Sequence[tuple[Hashable, Any, Any]] = (), closes: Sequence[int] = (),
               sessions: Sequence[int] = (), resync: bool = False) -> Iterator[GenerationRound]:
        """Rounds for the consumer `stream` holding `sessions`, until it has had nothing to do for idle_s;
        the first one takes `opens` and `closes` with whatever waits in the stream's inbox.

        With `resync`, the first round closes every session the consumer does not hold (one left
        by a failed stream, or by a previous gateway on an adopted replica), and every inbox but
        these `opens` and `closes` is dropped.
        """
        with self.lock:
            if resync:
                self._inboxes.clear()
        self.admit(stream, opens, closes)
        owned = set(sessions)
        while True:
            with self.lock:
                inbox = self._take(stream, owned, resync)
                if inbox is None:
                    return
                tags = [tag for tag, _, _ in inbox.opens]
                result = self._generate_batch([(r, d) for _, r, d in inbox.opens], inbox.closes, sorted(owned), resync)
                resync = False
                result.tags = tags
                owned = set(result.steps).difference(result.summaries)  # live ones: lost sessions drop out
            yield result

    def _take(self, stream: Hashable, owned: set[int], resync: bool) -> _Inbox | None:
        """The stream's inbox once there is work for a round; None after idle_s without any."""
        deadline = time.monotonic() + self.idle_s
        while True:
            inbox = self._inboxes.pop(stream, _Inbox())
            if inbox.opens or inbox.closes or resync or (owned and self._has_work()):
                return inbox
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._arrived.wait(remaining)


__all__ = ["IDLE_S", "RoundStreams"]
