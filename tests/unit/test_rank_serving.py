"""How a rank runs a decoder's cpu graphs: KV-cache writes in place and graphs deserialized on first use,
with the very outputs and cache state of the program as traced (tiny Llama at TP=1, no cluster)."""

import pytest
import torch
from torch.utils._pytree import tree_unflatten

from cluster.generation.layout import DecoderLayout, prefill_inputs, step_inputs
from cluster.models.llama import llama_from_checkpoint
from cluster.parallel_layers import parallel_state
from cluster.rank import RankWorker, collect_weights
from cluster.trace.cpu import CpuBackend, _serving_module
from tests.support import TINY_TARGET, save_random_llama

_LAYOUT = DecoderLayout(batch_buckets=(1, 2), prompt_buckets=(8,), cache_buckets=(16, 32))
_ATEN = torch.ops.aten


def _traced(tmp_path):
    save_random_llama(tmp_path / "llama", seed=5, vocab_size=64, **TINY_TARGET)
    with parallel_state.rank_context(0, 1, None):
        model, io_aliases = llama_from_checkpoint(tmp_path / "llama", _LAYOUT.max_batch, _LAYOUT.max_cache)
    weights = collect_weights(model)
    backend = CpuBackend()
    with torch.no_grad():
        graphs = [backend.trace(model, example, weights) for example in _LAYOUT.examples()]
    aliases = RankWorker._alias_names(model, io_aliases, False)
    return graphs, weights, aliases


def _as_traced(graph, weights):
    """The program's own graph module, as traced: functional, its state outputs copied back by the rank."""
    order = graph.call_spec.in_spec.child(0).child(0).context
    module, flat, spec = graph.graph_module, [weights[name] for name in order], graph.call_spec.out_spec
    return lambda *inputs: tree_unflatten(list(module(*flat, *inputs)), spec)


def _decode(worker, rows, steps):
    """Prefill `rows` prompts, then `steps` greedy decode steps: every step's logits."""
    prompts = [[3, 9, 27, 1, 50][: 3 + r] for r in range(rows)]
    bucket, inputs = prefill_inputs(_LAYOUT, prompts)
    logits = worker._run(bucket, inputs)[0][:rows, 0]
    out, starts = [logits], [len(p) for p in prompts]
    for _ in range(steps):
        bucket, inputs = step_inputs(_LAYOUT, "decode", [[int(t)] for t in logits.argmax(-1)], starts)
        logits = worker._run(bucket, inputs)[0][:rows, 0]
        out.append(logits)
        starts = [s + 1 for s in starts]
    return torch.stack(out)


def _worker(graphs, weights, aliases, as_traced):
    worker = RankWorker(0, 1)
    worker._backend, worker._aliases = CpuBackend(), aliases
    worker._weights = {k: v.clone() for k, v in weights.items()}
    worker._graphs = list(graphs)
    if as_traced:
        worker._calls = [_as_traced(g, worker._weights) for g in graphs]
    else:
        worker._calls = [worker._backend.bind(g, worker._weights, aliases) for g in graphs]
    return worker


@pytest.mark.slow
def test_cache_writes_in_place_give_the_traced_programs_outputs_and_state(tmp_path):
    graphs, weights, aliases = _traced(tmp_path)
    for rows in (1, 2):
        traced = _worker(graphs, weights, aliases, as_traced=True)
        served = _worker(graphs, weights, aliases, as_traced=False)
        assert torch.equal(_decode(served, rows, 12), _decode(traced, rows, 12))
        for name in aliases:  # the KV caches hold the same values, bit for bit
            assert torch.equal(served._weights[name], traced._weights[name])
    order = graphs[0].call_spec.in_spec.child(0).child(0).context
    module = _serving_module(graphs[0], {order.index(n): i for n, i in aliases.items()})
    targets = [n.target for n in module.graph.nodes]
    assert targets.count(_ATEN.scatter_.src) == len(aliases) and _ATEN._assert_tensor_metadata.default not in targets
    # the program itself stays as traced (it is what gets saved)
    assert _ATEN.scatter_.src not in [n.target for n in graphs[0].graph_module.graph.nodes]


def test_a_loaded_rank_deserializes_each_graph_on_its_first_run(tmp_path):
    graphs, weights, aliases = _traced(tmp_path)
    blobs = [CpuBackend().dump(g) for g in graphs]
    loaded = RankWorker(0, 1)
    loaded.load("cpu", blobs, {k: v.clone() for k, v in weights.items()}, 0, aliases)
    assert loaded._graphs == [None] * len(blobs)
    expected = _decode(_worker(graphs, weights, aliases, as_traced=True), 1, 6)
    assert torch.equal(_decode(loaded, 1, 6), expected)
    used = [_LAYOUT.kinds().index(kind) for kind in (("prefill", 1, 8), ("decode", 1, 16))]
    assert [b for b, g in enumerate(loaded._graphs) if g is not None] == used
    assert loaded.export().graphs == blobs  # saved again as loaded, byte for byte
