"""Bad input on real rank actors: each a clear exception, no hang, and the cluster still usable."""

import pytest
import torch

import cluster
from cluster.errors import CapacityError, InputError, RankError, ShardingError
from cluster.parallel_layers import parallel_state
from tests.support import Block, block_builder

pytestmark = pytest.mark.integration

def failing_on_rank_one(build):
    def broken_on_rank_one():
        if parallel_state.get_tensor_model_parallel_rank() == 1:
            raise KeyError("layer 3 weights")
        return build()
    return broken_on_rank_one


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(7)
    return Block().eval()


def test_bad_calls_then_the_cluster_keeps_serving(ray_cluster, reference):
    ids = torch.randint(0, 32, (2, 6))
    block_model = block_builder(reference.state_dict())

    with pytest.raises(RankError) as info:
        cluster.trace.parallel_model_trace(failing_on_rank_one(block_model), ids, tp_degree=2, progress=False)
    assert "rank 1: KeyError: 'layer 3 weights'" in str(info.value)
    assert "broken_on_rank_one" in info.value.remote_traceback

    with pytest.raises(ShardingError, match=r"rank \d: ParallelEmbedding\(32, 16\) num_embeddings: size 32 does not divide by tp_degree 5; pick a tp_degree"):
        cluster.trace.parallel_model_trace(block_model, ids, tp_degree=5, progress=False)

    # an error, never a silently pending actor (pytest-timeout would catch a hang)
    with pytest.raises(CapacityError, match="tp_degree 16 needs 16 NeuronCores on one node, but the largest node has 12"):
        cluster.trace.parallel_model_trace(block_model, ids, tp_degree=16, progress=False)

    with cluster.trace.parallel_model_trace(block_model, ids, tp_degree=2, progress=False) as model:
        with pytest.raises(InputError, match=r"inputs \(int64\[2, 9\]\) do not match the traced signature \(int64\[2, 6\]\)"):
            model(torch.zeros(2, 9, dtype=torch.long))
        with pytest.raises(InputError, match=r"inputs \(float32\[2, 6\]\)"):
            model(torch.zeros(2, 6))
        torch.testing.assert_close(model(ids), reference(ids), atol=1e-5, rtol=1e-5)
