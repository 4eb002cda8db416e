"""Collectives between the ranks of one node through a shared-memory segment.

Every TP group of a replica lives on one node (its placement group is STRICT_PACK), so its
per-token reductions need no sockets. Each rank copies its part into its own slot of a segment
that all ranks map, publishes the round number, and sleeps in the kernel (a futex on the peer's
round number) until every peer has published the same round. It then reads the parts in rank
order: the same bits on every rank, and the same arithmetic as `ThreadCollectives`.

Layout: a header page (per rank, on its own cache line: the round it last published, its pid
and one flag per peer that sleeps waiting on it, so a publish makes the wake syscall only when
someone sleeps), then per rank two data buffers of `slot_bytes`. Round g uses buffer g % 2: a rank starts
round g only after every peer published g - 1, which a peer does only after it finished reading
round g - 2, so no one still reads the buffer being written. Tensors larger than a buffer go in
several rounds.

Waits sleep in slices of `poll_s` (no busy loop to starve the other processes of a small node);
between slices the waiter checks the peer's process is alive and the deadline: a dead peer is a
`RankFailure` within one slice, never a hang.

The segment has a name in /dev/shm only while the group forms: once every rank has mapped it,
rank 0 unlinks it, so nothing is left behind however the processes end (kill -9 included), and
the memory goes back to the system when the last rank exits or closes the group.

Ordering: ranks publish with a plain store after copying their part. x86-64 keeps stores in
order as every other core sees them, so this module is used only there (`supported()`); other
machines keep gloo.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import platform
import time
import uuid

import numpy as np
import torch

from cluster.errors import RankFailure

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "tpcluster-tp-"
DEFAULT_SLOT_BYTES = 1 << 20  # per rank and buffer; larger tensors go in several rounds
SHM_DIR = "/dev/shm"
_LINE = 64  # bytes per rank in the header: its published round, its pid, then one "asleep on it" flag per rank
_MAX_RANKS = (_LINE - 8) // 4
_HEADER_BYTES = 4096
_ROUNDS = 1 << 31
_SYS_FUTEX = {"x86_64": 202}
_FIRST_SLICE_S = 0.002  # the first sleep of a wait; later ones double up to poll_s
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # not FUTEX_PRIVATE: the word is shared between processes


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def supported() -> bool:
    """Shared-memory collectives need Linux futexes, x86-64 store ordering and /dev/shm."""
    return platform.system() == "Linux" and platform.machine() in _SYS_FUTEX and os.path.isdir(SHM_DIR)


class _Futex:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._number = _SYS_FUTEX[platform.machine()]

    def wait(self, address: int, expected: int, timeout_s: float) -> None:
        """Sleep while the int32 at `address` holds `expected`, at most timeout_s."""
        seconds = int(timeout_s)
        spec = _Timespec(seconds, int((timeout_s - seconds) * 1e9))
        self._libc.syscall(self._number, ctypes.c_void_p(address), _FUTEX_WAIT, ctypes.c_int(expected),
                           ctypes.byref(spec), None, 0)

    def wake(self, address: int) -> None:
        self._libc.syscall(self._number, ctypes.c_void_p(address), _FUTEX_WAKE, ctypes.c_int(2**31 - 1), None, None, 0)


class SharedMemoryGroup:
    """One TP group's shared-memory all-gather; `gather(t)` returns every rank's `t`, stacked."""

    def __init__(self, path: str, rank: int, world_size: int, slot_bytes: int, timeout_s: float,
                 poll_s: float = 0.05) -> None:
        self.rank, self.world_size = rank, world_size
        self.slot_bytes, self.timeout_s, self.poll_s = slot_bytes, timeout_s, poll_s
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, segment_bytes(world_size, slot_bytes))
        finally:
            os.close(fd)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self._base = ctypes.addressof(self._anchor)
        self._header = np.frombuffer(self._map, dtype=np.int32, count=_HEADER_BYTES // 4)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._futex = _Futex()
        self._round = 0
        self._slice = _FIRST_SLICE_S
        self._header[self._word(rank) + 1] = os.getpid()
        self._sleepers = slice(self._word(rank) + 2, self._word(rank) + 2 + world_size)

    @staticmethod
    def _word(rank: int) -> int:
        return rank * _LINE // 4

    def peer_pids(self) -> list[int]:
        return [int(self._header[self._word(r) + 1]) for r in range(self.world_size)]

    def _buffer(self, rank: int, parity: int) -> torch.Tensor:
        start = _HEADER_BYTES + (2 * rank + parity) * self.slot_bytes
        return self._bytes[start : start + self.slot_bytes]

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[world_size, *tensor.shape]: every rank's tensor, in rank order (all ranks call it in step)."""
        source = tensor.detach().contiguous().view(-1).view(torch.uint8)
        out = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype)
        target = out.view(self.world_size, -1).view(torch.uint8) if tensor.numel() else None
        for offset in range(0, max(source.numel(), 1), self.slot_bytes):
            chunk = source[offset : offset + self.slot_bytes]
            parity = self._publish(chunk)
            if target is not None:
                for peer in range(self.world_size):
                    target[peer, offset : offset + chunk.numel()].copy_(self._buffer(peer, parity)[: chunk.numel()])
        return out

    def _publish(self, chunk: torch.Tensor) -> int:
        self._round = self._round % (_ROUNDS - 1) + 1
        parity = self._round % 2
        self._buffer(self.rank, parity)[: chunk.numel()].copy_(chunk)
        word = self._word(self.rank)
        self._header[word] = self._round  # after the copy: x86-64 keeps the two stores in this order
        if self._header[self._sleepers].any():  # a wake is a syscall; skip it when every peer is still busy
            self._futex.wake(self._base + word * 4)
        for peer in range(self.world_size):
            if peer != self.rank:
                self._wait_for(peer)
        return parity

    def _wait_for(self, peer: int) -> None:
        word = self._word(peer)
        following = self._round % (_ROUNDS - 1) + 1  # a peer may already be one round ahead
        deadline = time.monotonic() + self.timeout_s
        while (seen := int(self._header[word])) not in (self._round, following):
            now = time.monotonic()
            if now > deadline:
                raise RankFailure(peer, f"rank {peer} (pid {int(self._header[word + 1])}) did not reach collective "
                                        f"round {self._round} within {self.timeout_s:.0f} s (it is at {seen})")
            pid = int(self._header[word + 1])
            if not _alive(pid):
                raise RankFailure(peer, f"rank {peer} (pid {pid}) died during a collective")
            # Say we sleep, then look again before sleeping: a publish between the two is seen, and the
            # futex itself refuses to sleep once the word has moved on. x86 may still let the peer read
            # the flag before it sees it set; then this sleep ends at its (short) timeout instead.
            flag = word + 2 + self.rank
            self._header[flag] = 1
            if int(self._header[word]) == seen:
                self._futex.wait(self._base + word * 4, seen, min(self._slice, self.poll_s, deadline - now))
            self._header[flag] = 0
            self._slice = min(self._slice * 2, self.poll_s)
        self._slice = _FIRST_SLICE_S

    def close(self) -> None:
        """Unmap the segment (its memory goes back once every rank has closed or exited)."""
        if self._map.closed:
            return
        del self._bytes, self._header, self._anchor
        self._map.close()


def form_shared_memory_group(rank: int, world_size: int, timeout_s: float,
                             slot_bytes: int = DEFAULT_SLOT_BYTES) -> SharedMemoryGroup | None:
    """The group's shared-memory collectives, formed over the (gloo) default process group.

    Rank 0 creates the segment and every rank tries to map it: ranks on other nodes, in other
    containers or on other architectures cannot, and then the whole group keeps gloo (None).
    """
    import torch.distributed as dist

    path: list[str | None] = [None]
    if rank == 0 and supported() and world_size <= _MAX_RANKS:  # larger groups (inf2.48xlarge TP=24) keep gloo
        try:
            path[0] = create_segment(world_size, slot_bytes)
        except OSError as exc:
            log.warning("no shared-memory collectives (%s); the group uses gloo", exc)
    dist.broadcast_object_list(path, src=0)
    group, problem = None, ""
    try:
        if path[0] is not None and supported():
            try:
                group = SharedMemoryGroup(path[0], rank, world_size, slot_bytes, timeout_s)
            except OSError as exc:
                problem = f"rank {rank}: {exc}"
        elif path[0] is not None:
            problem = f"rank {rank}: {platform.system()} {platform.machine()} has no shared-memory collectives"
        problems: list[str] = [""] * world_size
        dist.all_gather_object(problems, problem)  # also the barrier after which no rank needs the name
    finally:
        if rank == 0 and path[0] is not None:
            remove_segment(path[0])
    if path[0] is None or any(problems):
        if group is not None:
            group.close()
        if any(problems):
            log.warning("no shared-memory collectives (%s); the group uses gloo", "; ".join(p for p in problems if p))
        return None
    return group


def segment_bytes(world_size: int, slot_bytes: int) -> int:
    return _HEADER_BYTES + 2 * world_size * slot_bytes


def create_segment(world_size: int, slot_bytes: int) -> str:
    """A new zeroed segment in /dev/shm, readable by this user only; returns its path."""
    if world_size > _MAX_RANKS:
        raise ValueError(f"shared-memory collectives hold at most {_MAX_RANKS} ranks, not {world_size}")
    path = os.path.join(SHM_DIR, f"{SEGMENT_PREFIX}{uuid.uuid4().hex}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, segment_bytes(world_size, slot_bytes))
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path


def remove_segment(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not mapped yet: the formation barrier bounds that wait
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    except (OSError, IndexError):
        return True  # cannot tell: the deadline bounds the wait
    return state not in (b"Z", b"X")  # a zombie has died; its parent has not reaped it yet


__all__ = ["SEGMENT_PREFIX", "SharedMemoryGroup", "create_segment", "form_shared_memory_group", "remove_segment",
           "supported"]
