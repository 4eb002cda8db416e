"""Rank graphs compiled to machine code (AOTInductor, cluster.trace.compiled) on the cpu backend:
the outputs and KV-cache state of the interpreted graphs, one compile per graph on a machine, and
the package found again by every rank that binds the same graph (tiny Llama at TP=1, no cluster)."""

import pytest
import torch

from cluster.generation.layout import DecoderLayout, prefill_inputs, step_inputs
from cluster.models.llama import llama_from_checkpoint
from cluster.parallel_layers import parallel_state
from cluster.rank import RankWorker, collect_weights
from cluster.trace.compiled import CompiledCall, compiler_missing
from cluster.trace.cpu import CpuBackend
from tests.support import TINY_TARGET, save_random_llama

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(compiler_missing()), reason="compiling graphs needs g++")]

_LAYOUT = DecoderLayout(batch_buckets=(2,), prompt_buckets=(8,), cache_buckets=(32,))  # a prefill and a decode graph


def _worker(tmp_path):
    """A rank holding the tiny Llama's two graphs (as loaded from a folder: graph files, bound on first use)."""
    if not (tmp_path / "llama").exists():
        save_random_llama(tmp_path / "llama", seed=5, vocab_size=64, **TINY_TARGET)
    with parallel_state.rank_context(0, 1, None):
        model, io_aliases = llama_from_checkpoint(tmp_path / "llama", _LAYOUT.max_batch, _LAYOUT.max_cache)
    backend, weights = CpuBackend(), collect_weights(model)
    with torch.no_grad():
        blobs = [backend.dump(backend.trace(model, example, weights)) for example in _LAYOUT.examples()]
    worker = RankWorker(0, 1)
    worker._backend, worker._aliases = backend, RankWorker._alias_names(model, io_aliases, False)
    worker._weights = {k: v.clone() for k, v in weights.items()}
    worker._graphs, worker._calls, worker._blobs = [None] * len(blobs), [None] * len(blobs), blobs
    return worker


def _decode(worker, steps=20):
    """Prefill two prompts, then greedy decode steps: every step's logits."""
    prompts = [[3, 9, 27, 1, 50], [7, 7]]
    bucket, inputs = prefill_inputs(_LAYOUT, prompts)
    logits = worker._run(bucket, inputs)[0][:2, 0]
    out, starts = [logits], [len(p) for p in prompts]
    for _ in range(steps):
        bucket, inputs = step_inputs(_LAYOUT, "decode", [[int(t)] for t in logits.argmax(-1)], starts)
        logits = worker._run(bucket, inputs)[0][:2, 0]
        out.append(logits)
        starts = [s + 1 for s in starts]
    return torch.stack(out)


def test_compiled_graphs_give_the_interpreted_outputs_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TPCLUSTER_CACHE", str(tmp_path / "cache"))
    interpreted = _worker(tmp_path)
    expected = _decode(interpreted)
    compiled = _worker(tmp_path)
    done = compiled.compile_graphs()
    assert [(bucket, made) for bucket, _, made in done] == [(0, True), (1, True)]
    assert all(isinstance(call, CompiledCall) for call in compiled._calls)
    got = _decode(compiled)
    assert torch.allclose(got, expected, atol=1e-4) and torch.equal(got.argmax(-1), expected.argmax(-1))
    for name in interpreted._aliases:  # the KV caches, written in place by the compiled graphs
        assert torch.allclose(compiled._weights[name], interpreted._weights[name], atol=1e-4)
    other = _worker(tmp_path)
    assert [made for _, _, made in other.compile_graphs()] == [False, False]  # compiled once: found, not made again
    bound = _worker(tmp_path)
    bound.compile_graphs([])  # graphs bound from now on run their packages, found in the cache
    assert torch.allclose(_decode(bound), expected, atol=1e-4)  # bound on first use: the package is found
    assert all(isinstance(call, CompiledCall) for call in bound._calls)
