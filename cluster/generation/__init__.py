"""Generation on traced decoders: sampling, speculative decoding, and the generate() API.

The round of the loop is plan (`plan.plan_round`, pure) -> execute -> update
(`engine.DecodeBatch.step`); defaults and limits live in `defaults.DEFAULTS`; the value types
(requests, results, rounds) in `types`, which imports no torch.
"""

from cluster.generation.api import GenerationOutput, GenerationStream, generate, stream_generate
from cluster.generation.defaults import DEFAULTS, GenerationDefaults
from cluster.generation.layout import DecoderLayout
from cluster.generation.ngram import NGRAM_DRAFT
from cluster.generation.plan import DraftPlan, RoundPlan, RowState, plan_round
from cluster.generation.speculative import SpeculationStats, verify_draft
from cluster.generation.stats import GenerationStats
from cluster.generation.types import GenerationRequest, SamplingParams, SessionSummary, StepResult

__all__ = [
    "DEFAULTS",
    "DecoderLayout",
    "DraftPlan",
    "GenerationDefaults",
    "GenerationOutput",
    "GenerationRequest",
    "GenerationStats",
    "GenerationStream",
    "NGRAM_DRAFT",
    "RoundPlan",
    "RowState",
    "SamplingParams",
    "SessionSummary",
    "SpeculationStats",
    "StepResult",
    "generate",
    "plan_round",
    "stream_generate",
    "verify_draft",
]
