"""Generation on traced decoders: sampling, speculative decoding, and the generate() API."""

from cluster.generation.api import GenerationOutput, GenerationStream, generate, stream_generate
from cluster.generation.layout import DecoderLayout
from cluster.generation.sampling import SamplingParams
from cluster.generation.speculative import SpeculationStats, verify_draft

__all__ = [
    "DecoderLayout",
    "GenerationOutput",
    "GenerationStream",
    "SamplingParams",
    "SpeculationStats",
    "generate",
    "stream_generate",
    "verify_draft",
]
