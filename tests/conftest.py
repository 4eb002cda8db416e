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
    """One local Ray cluster per test session, bound to 127.0.0.1, advertising 8 logical NeuronCores."""
    import cluster

    cluster.init(neuron_cores=8)
    yield
    cluster.shutdown()
