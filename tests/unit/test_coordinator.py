"""The coordinator and trace API over in-process ranks (eager backend): no Ray."""

import pytest
import torch

import cluster
from cluster.errors import ArtifactError, BucketError, InputError, RankError
from cluster.parallel_layers import parallel_state
from cluster.parallel_layers.sharding import partition_dims, split_state_dict
from cluster.trace import BucketModelConfig, parallel_model_save, parallel_model_trace
from tests.support import Block

CHECKPOINT = {}


def block_model():
    model = Block().eval()
    rank, world = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()
    model.load_state_dict(split_state_dict(CHECKPOINT["state"], partition_dims(model), rank, world))
    return model, {}


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(5)
    model = Block().eval()
    CHECKPOINT["state"] = model.state_dict()
    return model


def test_eager_trace_matches_reference(reference):
    ids = torch.randint(0, 32, (2, 6))
    with parallel_model_trace(block_model, ids, tp_degree=2, backend="eager", progress=False) as model:
        torch.testing.assert_close(model(ids), reference(ids), atol=1e-5, rtol=1e-5)
        assert model.tp_degree == 2 and model.backend == "eager"


def test_wrong_shape_or_dtype_names_the_signature(reference):
    ids = torch.randint(0, 32, (2, 6))
    with parallel_model_trace(block_model, ids, tp_degree=2, backend="eager", progress=False) as model:
        with pytest.raises(InputError, match=r"inputs \(int64\[2, 7\]\) do not match the traced signature \(int64\[2, 6\]\)"):
            model(torch.zeros(2, 7, dtype=torch.long))
        with pytest.raises(InputError, match=r"float32\[2, 6\]"):
            model(torch.zeros(2, 6))
        with pytest.raises(InputError, match="tensor or a non-empty tuple"):
            model("text")
        torch.testing.assert_close(model(ids), reference(ids), atol=1e-5, rtol=1e-5)  # still serving


def failing_model():
    raise RuntimeError("checkpoint server unreachable")


def test_a_raising_function_names_the_rank_and_keeps_the_traceback():
    with pytest.raises(RankError) as info:
        parallel_model_trace(failing_model, torch.zeros(1, 2), tp_degree=2, backend="eager", progress=False)
    assert "rank 0: RuntimeError: checkpoint server unreachable" in str(info.value)
    assert "failing_model" in info.value.remote_traceback


def test_bucketed_eager_model(reference):
    buckets = [4, 8]
    config = BucketModelConfig(lambda: cluster.sequence_bucket_kernel(buckets, num_inputs=1))
    examples = [(torch.zeros(2, b, dtype=torch.long),) for b in buckets]
    with parallel_model_trace(block_model, examples, tp_degree=2, backend="eager", inline_weights_to_neff=False,
                              bucket_config=config, progress=False) as model:
        for length in (1, 4, 5, 8):
            ids = torch.randint(1, 32, (2, length))
            padded = torch.cat([ids, torch.zeros(2, (4 if length <= 4 else 8) - length, dtype=torch.long)], 1)
            torch.testing.assert_close(model(ids), reference(padded), atol=1e-5, rtol=1e-5)
        with pytest.raises(BucketError, match=r"above the largest bucket \(int64\[2, 8\]\)"):
            model(torch.zeros(2, 9, dtype=torch.long))


def test_bucketing_needs_separated_weights():
    config = BucketModelConfig(lambda: cluster.sequence_bucket_kernel([4], 1))
    with pytest.raises(ValueError, match="bucketing needs inline_weights_to_neff=False"):
        parallel_model_trace(block_model, [(torch.zeros(1, 4),)], bucket_config=config, backend="eager")


def test_eager_models_cannot_be_saved(reference, tmp_path):
    with parallel_model_trace(block_model, torch.zeros(1, 3, dtype=torch.long), backend="eager", progress=False) as model:
        with pytest.raises(ArtifactError, match="backend='cpu' to save"):
            parallel_model_save(model, tmp_path / "m")


def test_bad_tp_degree_and_backend():
    with pytest.raises(ValueError, match="tp_degree must be a positive integer"):
        parallel_model_trace(block_model, torch.zeros(1, 3), tp_degree=0)
    with pytest.raises(cluster.errors.BackendUnavailable, match="torch-neuronx"):
        parallel_model_trace(block_model, torch.zeros(1, 3), backend="neuron")


def test_the_guide_names_are_exported_from_parallel_layers():
    from cluster.parallel_layers import checkpoint, layers

    assert cluster.parallel_layers.load is checkpoint.load and cluster.parallel_layers.save_sharded is checkpoint.save_sharded
    assert cluster.parallel_layers.ColumnParallelLinear is layers.ColumnParallelLinear
    assert sorted(cluster.parallel_layers.__all__) == ["ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear",
                                                       "layers", "load", "parallel_state", "save_sharded"]


def test_minilm_heads_must_divide_by_tp_degree():
    from cluster.errors import ShardingError
    from cluster.models.bert import minilm_embedder

    with pytest.raises(ShardingError, match="12 heads do not divide by tp_degree 8"):
        parallel_model_trace(minilm_embedder, torch.zeros(1, 4, dtype=torch.long), tp_degree=8, backend="eager", progress=False)


class Counter(torch.nn.Module):
    """State [4, 3] (io_aliases); each call adds x to the rows of its batch and returns them."""

    def __init__(self, wrong: bool = False):
        super().__init__()
        self.register_buffer("state", torch.zeros(4, 3))
        self.wrong = wrong

    def forward(self, x):
        rows = self.state[: x.shape[0]] + x
        return rows.sum(), (rows[:, :2] if self.wrong else rows)


def counter_model():
    model = Counter()
    return model, {model.state: 1}


def wrong_counter_model():
    model = Counter(wrong=True)
    return model, {model.state: 1}


def test_state_outputs_may_update_only_the_batch_rows():
    ones = torch.ones(2, 3)
    with parallel_model_trace(counter_model, ones, tp_degree=1, backend="eager", inline_weights_to_neff=False, progress=False) as model:
        model(ones)
        assert float(model(ones * 2)[0]) == 18.0  # rows 0-1 hold 1 + 2 each; rows 2-3 were never touched
    with parallel_model_trace(wrong_counter_model, ones, tp_degree=1, backend="eager", inline_weights_to_neff=False,
                              progress=False) as model:
        with pytest.raises(cluster.errors.ClusterError, match=r"state output 1 has shape \(2, 2\)"):
            model(ones)
