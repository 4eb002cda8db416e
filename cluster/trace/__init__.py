"""Tracing, saving and loading TP models (neuronx_distributed.trace), with autobucketing."""

from cluster.trace.api import parallel_model_load, parallel_model_save, parallel_model_trace, replace_weights
from cluster.trace.config import BucketModelConfig
from cluster.trace.fused import fuse_draft
from cluster.trace.model import ParallelModel

__all__ = [
    "BucketModelConfig",
    "ParallelModel",
    "fuse_draft",
    "parallel_model_load",
    "parallel_model_save",
    "parallel_model_trace",
    "replace_weights",
]
