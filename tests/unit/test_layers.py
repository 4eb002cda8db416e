import pytest
import torch

from cluster.errors import ShardingError
from cluster.parallel_layers import layers, parallel_state
from cluster.parallel_layers.sharding import partition_dims, shard_tensor, split_state_dict, unshard_tensors
from tests.support import Block
from tests.unit.ranks import run_ranks


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sharded_forward_equals_unsharded(tp):
    torch.manual_seed(0)
    full = Block().eval()
    state = full.state_dict()
    ids = torch.randint(0, 32, (3, 7))
    expected = full(ids)

    def rank_forward(rank):
        model = Block().eval()
        local = split_state_dict(state, partition_dims(model), rank, tp)
        model.load_state_dict(local)
        with torch.no_grad():
            return model(ids)

    outputs = run_ranks(tp, rank_forward)
    for out in outputs:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_layers_allocate_only_their_slice():
    def shapes(rank):
        col = layers.ColumnParallelLinear(16, 24, gather_output=False)
        row = layers.RowParallelLinear(24, 16, input_is_parallel=True)
        emb = layers.ParallelEmbedding(32, 16)
        return col.weight.shape, col.bias.shape, row.weight.shape, row.bias.shape, emb.weight.shape

    assert run_ranks(2, shapes)[1] == ((12, 16), (12,), (16, 12), (16,), (16, 16))


def test_indivisible_sizes_name_the_layer():
    def build(rank):
        layers.ColumnParallelLinear(16, 30)

    with pytest.raises(ShardingError, match=r"ColumnParallelLinear\(16, 30\) output_size: size 30 does not divide by tp_degree 4"):
        run_ranks(4, build)
    with pytest.raises(ValueError, match="RowParallelLinear"):
        run_ranks(4, lambda rank: layers.RowParallelLinear(30, 16))
    with pytest.raises(ValueError, match="ParallelEmbedding"):
        run_ranks(4, lambda rank: layers.ParallelEmbedding(30, 16))


def test_before_initialisation_models_build_as_tp1():
    assert parallel_state.get_tensor_model_parallel_size() == 1
    assert parallel_state.get_tensor_model_parallel_rank() == 0
    layer = layers.ColumnParallelLinear(8, 6)
    assert layer.weight.shape == (6, 8)
    parallel_state.initialize_model_parallel(1)
    assert parallel_state.model_parallel_is_initialized()
    parallel_state.destroy_model_parallel()
    with pytest.raises(ValueError, match="torch.distributed"):
        parallel_state.initialize_model_parallel(2)


def test_rank_context_reports_rank_and_size():
    seen = run_ranks(4, lambda rank: (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()))
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_shard_and_unshard_round_trip():
    full = torch.arange(24.0).reshape(4, 6)
    for dim in (0, 1):
        parts = [shard_tensor(full, r, 2, dim) for r in range(2)]
        assert torch.equal(unshard_tensors(parts, dim), full)
    with pytest.raises(ShardingError, match="does not divide"):
        shard_tensor(full, 0, 4, 1)
