"""tpcluster: the Neuronx-Distributed inference API on a Ray cluster of resident TP shards.

A script written against the NxD inference guide ports by replacing `neuronx_distributed` with
`cluster` (and `torch_neuronx.BucketModelConfig` with `cluster.trace.BucketModelConfig`).
"""

from cluster import errors, parallel_layers, trace
from cluster.buckets import propose_buckets, sequence_bucket_kernel
from cluster.coordinator import CoordinatorConfig
from cluster.errors import ClusterError
from cluster.runtime import init, shutdown

__all__ = [
    "ClusterError",
    "CoordinatorConfig",
    "errors",
    "init",
    "parallel_layers",
    "propose_buckets",
    "sequence_bucket_kernel",
    "shutdown",
    "trace",
]
