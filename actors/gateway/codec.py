"""The only place protobuf messages meet Python values: decode requests, encode responses
(the servicers in actors.gateway.server only call these).

Every check on what a client sent happens here and raises InputError (INVALID_ARGUMENT) or
Overloaded (RESOURCE_EXHAUSTED) with a message the client can act on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.gateway.signatures import input_names
from clients.protocol import inference_pb2 as pb
from clients.protocol import tensors
from cluster.errors import InputError, Overloaded
from cluster.generation.defaults import DEFAULTS
from cluster.generation.types import GenerationRequest, SamplingParams

MAX_TENSOR_ELEMENTS = 1 << 26  # 64 Mi elements: larger payloads are refused, not buffered
MAX_TEXTS = 1024
MAX_TEXT_CHARS = 100_000
MAX_STOP_SEQUENCES = 16


def decode_tensor(message: pb.Tensor, index: int) -> tuple[str, np.ndarray]:
    """(name, array) of an input tensor; the wire format itself is clients.protocol.tensors'."""
    label = f"input {index}" + (f" ({message.name!r})" if message.name else "")
    count = 1
    for d in message.shape:
        count *= max(d, 0)
        if count > MAX_TENSOR_ELEMENTS:
            raise Overloaded(f"{label}: shape {list(message.shape)} has more than {MAX_TENSOR_ELEMENTS} elements; "
                             "send smaller tensors")
    try:
        return message.name, tensors.from_tensor(message)
    except ValueError as exc:
        raise InputError(f"{label}: {exc}") from exc


def encode_tensor(name: str, array: np.ndarray) -> pb.Tensor:
    try:
        return tensors.to_tensor(name, array)
    except TypeError as exc:
        raise InputError(f"output {name!r} has dtype {array.dtype}, which the protocol cannot carry") from exc


def decode_texts(texts: Any, what: str = "texts") -> list[str]:
    texts = list(texts)
    if not texts:
        raise InputError(f"{what}: empty; send at least one text")
    if len(texts) > MAX_TEXTS:
        raise Overloaded(f"{what}: {len(texts)} texts in one request; send at most {MAX_TEXTS}")
    for i, text in enumerate(texts):
        if not text.strip():
            raise InputError(f"{what}[{i}] is empty; send non-empty text")
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(f"{what}[{i}] has {len(text)} characters; at most {MAX_TEXT_CHARS}")
    return texts


def decode_pairs(inputs: Any) -> list[tuple[str, str | None]]:
    inputs = list(inputs)
    firsts = decode_texts([i.text for i in inputs], "inputs.text")
    return [(a, i.text_pair or None) for a, i in zip(firsts, inputs)]


@dataclass(frozen=True)
class Sampling:
    """A Generate request's parameters, with the wire's zeros resolved to the defaults."""

    max_new_tokens: int = DEFAULTS.max_new_tokens
    temperature: float = DEFAULTS.temperature
    top_k: int = DEFAULTS.top_k
    top_p: float = DEFAULTS.top_p
    seed: int | None = None
    stop: tuple[str, ...] = ()
    draft_model: str = ""
    speculation_length: int = DEFAULTS.speculation_length
    ignore_eos: bool = False  # generate max_new_tokens whatever comes (OpenAI front: vLLM's `ignore_eos`)

    def request(self, prompt_ids: list[int], eos_token_id: int | None) -> GenerationRequest:
        params = SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)
        return GenerationRequest((tuple(prompt_ids),), self.max_new_tokens, params, None if self.ignore_eos else eos_token_id,
                                 self.speculation_length, streamed=True)


def decode_generate(request: pb.GenerateRequest) -> tuple[str, Sampling]:
    prompt = request.prompt
    if not prompt.strip():
        raise InputError("prompt is empty; send the text to continue")
    if len(prompt) > MAX_TEXT_CHARS:
        raise InputError(f"prompt has {len(prompt)} characters; at most {MAX_TEXT_CHARS}")
    s = request.sampling
    if request.max_new_tokens > DEFAULTS.max_new_tokens_limit:
        raise InputError(f"max_new_tokens {request.max_new_tokens} is above {DEFAULTS.max_new_tokens_limit}")
    if not (0.0 <= s.temperature <= 100.0) or s.temperature != s.temperature:
        raise InputError(f"temperature {s.temperature} is out of range; use 0 (greedy) to 100")
    if not (0.0 <= s.top_p <= 1.0) or s.top_p != s.top_p:
        raise InputError(f"top_p {s.top_p} is out of range; use a value in (0, 1], or 0 for no top-p")
    if s.top_k > 1_000_000:
        raise InputError(f"top_k {s.top_k} is out of range")
    if request.speculation_length > DEFAULTS.speculation_length_limit:
        raise InputError(f"speculation_length {request.speculation_length} is above {DEFAULTS.speculation_length_limit}")
    if any(not stop for stop in request.stop) or len(request.stop) > MAX_STOP_SEQUENCES:
        raise InputError(f"stop sequences must be non-empty strings, at most {MAX_STOP_SEQUENCES} of them")
    max_new, top_p, k = DEFAULTS.resolve(request.max_new_tokens, s.top_p, request.speculation_length)
    return prompt, Sampling(
        max_new_tokens=max_new, temperature=float(s.temperature), top_k=int(s.top_k), top_p=top_p,
        seed=int(s.seed) if s.HasField("seed") else None, stop=tuple(request.stop), draft_model=request.draft_model,
        speculation_length=k,
    )


# -- responses ---------------------------------------------------------------------------------
def embed_response(vectors: np.ndarray) -> pb.EmbedResponse:
    return pb.EmbedResponse(embeddings=[pb.Embedding(values=v.tolist()) for v in vectors], dimensions=int(vectors.shape[1]))


def classify_response(results: Sequence[Any]) -> pb.ClassifyResponse:
    """From actors.gateway.served.Classification rows."""
    return pb.ClassifyResponse(results=[pb.Classification(logits=r.logits.tolist(), label_id=r.label_id, label=r.label)
                                        for r in results])


def infer_response(outputs: Sequence[tuple[str, np.ndarray]]) -> pb.InferResponse:
    return pb.InferResponse(outputs=[encode_tensor(name, a) for name, a in outputs])


def decode_tokenize(request: pb.TokenizeRequest) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) to encode or (None, id rows) to decode."""
    if request.texts and request.token_ids:
        raise InputError("send texts (to encode) or token_ids (to decode), not both")
    if request.texts:
        return decode_texts(request.texts), None
    if not request.token_ids:
        raise InputError("nothing to tokenize: send texts (to encode) or token_ids (to decode)")
    if len(request.token_ids) > MAX_TEXTS:
        raise Overloaded(f"token_ids: {len(request.token_ids)} rows in one request; send at most {MAX_TEXTS}")
    rows = [list(row.ids) for row in request.token_ids]
    if sum(map(len, rows)) > MAX_TEXT_CHARS:
        raise InputError(f"token_ids: more than {MAX_TEXT_CHARS} ids in one request; send fewer")
    return None, rows


def tokenize_response(token_ids: Sequence[Sequence[int]] = (), texts: Sequence[str] = ()) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(token_ids=[pb.TokenIds(ids=list(row)) for row in token_ids], texts=list(texts))


def generate_event(token: int | None, piece: Any) -> pb.GenerateResponse:
    """A streamed token (id, text), or with token None the final cluster.generation.stats.GenerationStats."""
    if token is None:
        return pb.GenerateResponse(stats=pb.GenerateStats(**dataclasses.asdict(piece)))
    return pb.GenerateResponse(token=pb.GeneratedToken(id=token, text=piece))


def model_metadata(model: Any) -> pb.ModelMetadata:
    """A served model's metadata (actors.gateway.served.ServedModel): its Infer signature by name
    (decoders have none), its outputs, the RPCs it takes, and its defaults and limits."""
    info = model.pool.info
    buckets = []
    for sig in info.buckets:
        names = input_names(model.spec, len(sig))
        buckets.append(pb.Bucket(inputs=[pb.TensorSpec(name=n, dtype=s["dtype"], shape=s["shape"]) for n, s in zip(names, sig)]))
    return pb.ModelMetadata(name=model.name, task=model.spec.task, tp_degree=info.tp_degree, backend=info.backend or "",
                            buckets=buckets, inputs=[_spec(t) for t in model.inputs], ready=model.pool.ready,
                            replicas=len(model.pool.replicas), ready_replicas=model.pool.ready_count,
                            labels=list(model.spec.labels), max_sequence_length=model.max_length,
                            outputs=[_spec(t) for t in model.outputs], rpcs=model.rpcs, limits=limits(model),
                            fused_draft=getattr(model, "fused_draft", ""))


def _spec(info: Any) -> pb.TensorSpec:
    return pb.TensorSpec(name=info.name, dtype=info.dtype, shape=list(info.shape))


def limits(model: Any) -> pb.Limits:
    """The defaults and limits the gateway applies to requests to `model`."""
    common = {"max_texts": MAX_TEXTS, "max_text_characters": MAX_TEXT_CHARS,
              "max_batch_rows": model.max_rows if model.inputs else 0,
              "max_tensor_elements": MAX_TENSOR_ELEMENTS if model.inputs else 0}
    if model.spec.task != "generate":
        return pb.Limits(**common)
    layout = model.pool.info.decoder.get("layout", {})
    verify = int(layout.get("verify_tokens", 0))
    return pb.Limits(**common, max_new_tokens=DEFAULTS.max_new_tokens_limit, default_max_new_tokens=DEFAULTS.max_new_tokens,
                     max_speculation_length=min(DEFAULTS.speculation_length_limit, verify - 1) if verify else 0,
                     default_speculation_length=DEFAULTS.speculation_length,
                     context_length=max(layout.get("cache_buckets", [1])) - 1, max_stop_sequences=MAX_STOP_SEQUENCES,
                     default_top_p=DEFAULTS.top_p)


def replica_status(replica: Any, ranks: list[dict[str, Any]], pid: int, in_flight: int) -> pb.ReplicaStatus:
    """A replica (actors.gateway.pool.Replica) with its ranks as its coordinator described them."""
    return pb.ReplicaStatus(
        index=replica.index, ready=replica.ready, error=replica.error, in_flight=in_flight, coordinator_pid=pid,
        recoveries=replica.recoveries,
        ranks=[pb.RankStatus(rank=r["rank"], node=r.get("node", r.get("host", "")), neuron_cores=r.get("neuron_cores", ""),
                             pid=r["pid"], memory_bytes=r.get("memory_bytes", 0)) for r in ranks],
    )
