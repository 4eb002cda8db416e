import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("torch_neuronx") is None:
        skip = pytest.mark.skip(reason="needs torch-neuronx and a NeuronCore (inf2/trn1)")
        for item in items:
            if "neuron" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster per test session, bound to 127.0.0.1, advertising 12 logical NeuronCores."""
    import cluster

    cluster.init(neuron_cores=12)
    yield
    cluster.shutdown()


@pytest.fixture(scope="session")
def minilm_tp2(ray_cluster, tmp_path_factory):
    """The embedded MiniLM models traced at TP=2 (batch 1/4/16 x 32 tokens), shared by the tests that serve them."""
    from cluster.models.defaults import ensure_defaults

    return ensure_defaults(tp_degree=2, batch_buckets=(1, 4, 16), seq_buckets=(32,), root=tmp_path_factory.mktemp("minilm-tp2"))
