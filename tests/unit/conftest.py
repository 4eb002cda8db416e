"""Fixtures shared by the unit modules: one traced decoder pair per session."""

import pytest

from cluster.generation import DecoderLayout
from cluster.models.llama import trace_llama
from tests.support import TINY_DRAFT, TINY_LAYOUT, TINY_TARGET, TINY_VOCAB, save_random_llama


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """A tiny random Llama target and draft (transformers' own classes), traced at TP=2 on in-process
    ranks (eager backend): (the transformers target, target, draft, their folder)."""
    root = tmp_path_factory.mktemp("llama")
    hf = save_random_llama(root / "target", 0, TINY_VOCAB, **TINY_TARGET)
    save_random_llama(root / "draft", 1, TINY_VOCAB, **TINY_DRAFT)
    target = trace_llama(root / "target", tp_degree=2, layout=TINY_LAYOUT, backend="eager", progress=False)
    draft = trace_llama(root / "draft", tp_degree=2, layout=DecoderLayout((1, 4), (8, 16), (32, 64)), backend="eager", progress=False)
    yield hf, target, draft, root
    target.close()
    draft.close()
