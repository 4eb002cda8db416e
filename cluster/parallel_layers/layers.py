"""Tensor-parallel layers with the constructors of neuronx_distributed.parallel_layers.layers.

Each layer reads the TP rank and degree once, when built (from parallel_state), allocates only its
slice, and declares `partition_dims` (parameter name -> split dim) so checkpoint loading can slice
whole checkpoints. Rank-dependent constants (vocab offsets, input slices) live in non-persistent
buffers rather than Python ints, so the traced graph is the same on every rank and one trace can
serve all ranks with their own weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.parallel_layers import parallel_state
from cluster.parallel_layers.sharding import divide


def _tp() -> tuple[int, int]:
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()


class ColumnParallelLinear(nn.Module):
    """Y = XA + b with A split by columns (output features) across ranks.

    gather_output=True all-gathers the output so every rank holds the whole Y; False leaves each
    rank its slice (feed it to a RowParallelLinear with input_is_parallel=True).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.rank, self.world_size = _tp()
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        local = divide(output_size, self.world_size, f"ColumnParallelLinear({input_size}, {output_size}) output_size")
        self.weight = nn.Parameter(torch.empty(local, input_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(local, dtype=dtype, device=device)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.partition_dims = {"weight": 0, "bias": 0} if bias else {"weight": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output and self.world_size > 1:
            y = parallel_state.get_collectives().all_gather(y, dim=-1)
        return y

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.output_size}, tp={self.world_size}, gather_output={self.gather_output}"


class RowParallelLinear(nn.Module):
    """Y = XA + b with A split by rows (input features); partial products are all-reduced.

    input_is_parallel=True expects X already split (the output of a ColumnParallelLinear with
    gather_output=False); False takes the whole X and selects this rank's slice. The bias is added
    once, after the reduction, so it is replicated.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.rank, self.world_size = _tp()
        self.input_size = input_size
        self.output_size = output_size
        self.input_is_parallel = input_is_parallel
        local = divide(input_size, self.world_size, f"RowParallelLinear({input_size}, {output_size}) input_size")
        self.weight = nn.Parameter(torch.empty(output_size, local, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype, device=device)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.partition_dims = {"weight": 1}
        if not input_is_parallel:
            indices = torch.arange(self.rank * local, (self.rank + 1) * local, device=device)
            self.register_buffer("input_indices", indices, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.world_size > 1:
            x = x.index_select(-1, self.input_indices)
        y = F.linear(x, self.weight)
        if self.world_size > 1:
            y = parallel_state.get_collectives().all_reduce(y)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.output_size}, tp={self.world_size}, input_is_parallel={self.input_is_parallel}"


class ParallelEmbedding(nn.Module):
    """An embedding table split across ranks.

    By default the vocabulary is split (each rank looks up the ids it holds, zeros the rest, and
    the partial results are all-reduced); shard_across_embedding=True splits the embedding
    dimension instead and all-gathers.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        shard_across_embedding: bool = False,
    ) -> None:
        super().__init__()
        self.rank, self.world_size = _tp()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.shard_across_embedding = shard_across_embedding
        what = f"ParallelEmbedding({num_embeddings}, {embedding_dim})"
        if shard_across_embedding:
            local_dim = divide(embedding_dim, self.world_size, f"{what} embedding_dim")
            self.weight = nn.Parameter(torch.empty(num_embeddings, local_dim, dtype=dtype, device=device))
            self.partition_dims = {"weight": 1}
        else:
            local_vocab = divide(num_embeddings, self.world_size, f"{what} num_embeddings")
            self.weight = nn.Parameter(torch.empty(local_vocab, embedding_dim, dtype=dtype, device=device))
            self.partition_dims = {"weight": 0}
            self.register_buffer("vocab_start", torch.tensor(self.rank * local_vocab, device=device), persistent=False)
        nn.init.normal_(self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return F.embedding(ids, self.weight, self.padding_idx)
        if self.shard_across_embedding:
            return parallel_state.get_collectives().all_gather(F.embedding(ids, self.weight), dim=-1)
        local_ids = ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return parallel_state.get_collectives().all_reduce(out)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.world_size}"
