"""Shared-memory collectives between rank processes: the same bits as ThreadCollectives, captured
by torch.export as one op, a dead peer an error and no segment left behind.

Ranks here are plain processes (spawned, gloo on loopback for the rendezvous), no Ray.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from datetime import timedelta

import pytest
import torch

from cluster.parallel_layers import shared_memory
from cluster.parallel_layers.collectives import ProcessGroupCollectives, ThreadCollectives, use_gather
from tests.support import free_port

pytestmark = [pytest.mark.skipif(not shared_memory.supported(), reason="shared-memory collectives need Linux x86-64"),
              pytest.mark.slow]  # each test starts rank processes: 4-12 s

SHAPES = [(1, 768), (3, 5, 7), (0, 4), (2, 3000)]  # (2, 3000) fp32 spans several 4 KiB slots


def _inputs(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(shape, generator=generator) * 10 ** rank for shape in SHAPES]


def _rank_main(rank, world, port, scenario, results):
    import torch.distributed as dist

    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=30))
        group = shared_memory.form_shared_memory_group(rank, world, timeout_s=10.0, slot_bytes=4096)
        results.put((rank, "formed", group is not None))
        use_gather(group)
        collectives = ProcessGroupCollectives()
        if scenario == "values":
            out = [(collectives.all_reduce(t).numpy(), collectives.all_gather(t, -1).numpy()) for t in _inputs(rank)]
            results.put((rank, "values", out))
        elif scenario == "export":
            from cluster.trace.cpu import CpuBackend

            weight = torch.full((4, 4), float(rank + 1))

            class RowParallel(torch.nn.Module):
                def forward(self, x):
                    return collectives.all_reduce(x @ weight)

            backend = CpuBackend()
            graph = backend.trace(RowParallel(), (torch.ones(2, 4),), None)
            loaded = backend.load(backend.dump(graph), "test graph")
            ops = [str(node.target) for node in loaded.graph.nodes if node.op == "call_function"]
            results.put((rank, "export", (ops, backend.bind(loaded, None)(torch.ones(2, 4)).numpy())))
        elif scenario == "dead peer":
            if rank == 1:
                os._exit(0)  # gone without a word, as kill -9 leaves it
            try:
                collectives.all_reduce(torch.ones(3))
                results.put((rank, "dead peer", "no error"))
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                results.put((rank, "dead peer", f"{type(exc).__name__}: {exc}"))
        group.close()
    except Exception:  # noqa: BLE001 - reported to the test
        results.put((rank, "error", traceback.format_exc()))


def _run(world: int, scenario: str) -> dict[tuple[int, str], object]:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(r, world, port, scenario, results)) for r in range(world)]
    for proc in procs:
        proc.start()
    found, deadline = {}, time.monotonic() + 90
    try:
        while any(proc.is_alive() for proc in procs) or not results.empty():  # drain first: a rank exits once its queue is read
            assert time.monotonic() < deadline, "a rank hung"
            try:
                rank, kind, value = results.get(timeout=0.2)
            except queue.Empty:
                continue
            assert kind != "error", value
            found[(rank, kind)] = value
        return found  # tensors travel as numpy arrays: torch's own queue sharing needs the sender alive
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()


def _segments() -> set[str]:
    return {n for n in os.listdir(shared_memory.SHM_DIR) if n.startswith(shared_memory.SEGMENT_PREFIX)}


@pytest.mark.parametrize("world", [2, 3])
def test_bitwise_equal_to_thread_collectives(world):
    before = _segments()
    found = _run(world, "values")
    assert all(found[(r, "formed")] for r in range(world))
    expected_collectives = ThreadCollectives(world)
    inputs = [_inputs(r) for r in range(world)]
    for i in range(len(SHAPES)):
        parts = [inputs[r][i] for r in range(world)]
        reduced = parts[0].clone()
        for part in parts[1:]:
            reduced += part  # what ThreadCollectives does, in rank order
        gathered = torch.cat(parts, dim=-1)
        for r in range(world):
            got_reduced, got_gathered = map(torch.from_numpy, found[(r, "values")][i])
            assert torch.equal(got_reduced, reduced), (r, SHAPES[i])
            assert torch.equal(got_gathered, gathered), (r, SHAPES[i])
    assert expected_collectives.world_size == world
    assert _segments() == before  # unlinked once every rank had mapped it


def test_torch_export_captures_one_op_that_runs_after_a_save():
    found = _run(2, "export")
    expected = torch.ones(2, 4) @ torch.full((4, 4), 1.0) + torch.ones(2, 4) @ torch.full((4, 4), 2.0)
    for rank in range(2):
        ops, out = found[(rank, "export")]
        assert "tpcluster.all_gather.default" in ops
        assert not any("c10d" in op for op in ops)
        assert torch.equal(torch.from_numpy(out), expected)


def test_a_dead_peer_is_an_error_not_a_hang_and_leaves_no_segment():
    before = _segments()
    found = _run(2, "dead peer")
    assert found[(0, "formed")]
    assert found[(0, "dead peer")].startswith("RankFailure") and "died" in found[(0, "dead peer")]
    assert _segments() == before
