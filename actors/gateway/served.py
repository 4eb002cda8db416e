"""The data path of one served model: request validation, tokenisation, batching, Generate streaming.

Text tasks (embed, classify) tokenize at submit time, so bad input is refused before it queues;
the batcher then merges rows from concurrent requests into one forward on a replica the pool
picks. Only token ids and output rows cross to the coordinator. Which replica serves, and what
happens when one is lost, is the pool's business (actors.gateway.pool), and for Generate the
router's (actors.gateway.router).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
import torch

from actors.gateway.batching import BatchingConfig, DynamicBatcher
from actors.gateway.codec import Sampling
from actors.gateway.pool import Replica, ReplicaPool
from actors.gateway.router import GenerationRouter
from actors.gateway.scheduling import Ended, Generation, ReplicaScheduler
from actors.gateway.signatures import (
    TensorInfo,
    input_specs,
    merge_output_specs,
    order_inputs,
)
from actors.gateway.text import TextStream
from cluster.errors import InputError, Overloaded
from cluster.generation.layout import DecoderLayout
from cluster.generation.ngram import NGRAM_DRAFT
from cluster.generation.stats import GenerationStats
from cluster.models.inputs import embed_inputs, joint_inputs, pair_inputs
from cluster.serving import ServingSpec


def _leaves(outputs: Any) -> list[np.ndarray]:
    leaves = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    return [t.detach().contiguous().numpy() for t in leaves]


@dataclass(frozen=True)
class Classification:
    logits: np.ndarray
    label_id: int
    label: str


class ServedModel:
    def __init__(self, name: str, spec: ServingSpec, pool: ReplicaPool, batching: BatchingConfig, metrics: Any = None) -> None:
        self.name = name
        self.spec = spec
        self.pool = pool
        self.metrics = metrics
        self.tokenizer = None
        if spec.tokenizer and pool.folder is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(pool.folder / spec.tokenizer)
        layout = pool.info.decoder.get("layout", {})
        # a draft compiled into this model (cluster.trace.fused): Generate names it, no replica is borrowed
        self.fused_draft: str = (pool.info.extra.get("fused_draft") or {}).get("name", "")
        # a T5 (cluster.models.t5): its prompt is the encoder's input, so a stream cannot go on from a re-prefill
        self.encoder_decoder = bool(pool.info.decoder.get("encoder_decoder"))
        self.max_length = spec.max_length or max(spec.seq_buckets, default=0)
        if spec.task == "generate" and not self.max_length:  # longer prompts are prefilled in chunks, when traced so
            self.max_length = DecoderLayout.from_json(layout).max_prompt if layout else 0
        self.max_rows = max(spec.batch_buckets) if spec.batch_buckets else 1
        # Infer's signature: decoders advertise none (their graphs write the KV cache Generate holds)
        self.inputs: list[TensorInfo] = [] if spec.task == "generate" else input_specs(spec, pool.info.buckets)
        self.outputs: list[TensorInfo] = []  # from describe_outputs(), once serving
        concurrency = len(pool.replicas)
        self.batcher = DynamicBatcher(name, self._run_batch, batching, concurrency, on_batch=self.record_batch)
        self.infer_batcher = DynamicBatcher(name, self._run_infer_batch, batching, concurrency, on_batch=self.record_batch)
        self.max_queue = batching.max_queue
        self.router: GenerationRouter | None = None  # Generate's, above one scheduler per replica
        self.schedulers: list[ReplicaScheduler] = []
        self.carried_on = 0  # Generate streams moved to another replica when theirs was lost
        self.generations = self.prefix_hits = self.prefix_reused_tokens = 0  # Generate, for GetStatus
        if spec.task == "generate":  # continuous batching: one scheduler per replica's KV cache
            slots = max(layout.get("batch_buckets", [1]))
            slots = min(slots, batching.max_sequences) if batching.max_sequences else slots
            self.router = GenerationRouter(name, pool, slots, self.max_length, self.encoder_decoder,
                                           self.record_batch, self.record_carried_on)
            self.schedulers = self.router.schedulers

    def record_batch(self, rows: int) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.labels(model=self.name).observe(rows)

    def record_carried_on(self) -> None:
        self.carried_on += 1
        if self.metrics is not None:
            self.metrics.carried_on.labels(self.name).inc()

    @property
    def ready(self) -> bool:
        return self.pool.ready

    @property
    def queue_depth(self) -> int:
        return self.batcher.depth + self.infer_batcher.depth + sum(len(s.waiting) for s in self.schedulers)

    def generations_on(self, replica: Replica) -> int:
        return sum(len(s.active) for s in self.schedulers if s.replica is replica)

    @property
    def rpcs(self) -> list[str]:
        """The tpcluster.v1 RPCs this model takes."""
        own = {"embed": ["Embed"], "classify": ["Classify"], "infer": [], "generate": ["Generate"]}[self.spec.task]
        return own + (["Infer"] if self.inputs else []) + (["Tokenize"] if self.tokenizer is not None else [])

    async def describe_outputs(self) -> list[TensorInfo]:
        """Learn what Infer returns from forwards on zeros shaped as the smallest and the largest
        bucket (encoders only: they keep no state). Sets and returns `outputs`."""
        buckets = self.pool.info.buckets
        if not self.inputs or not buckets:
            return self.outputs
        probes = []
        for signature in {0: buckets[0], len(buckets) - 1: buckets[-1]}.values():
            inputs = tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in signature)
            rows = int(inputs[0].shape[0]) if inputs[0].dim() else 0
            probes.append((rows, await self._forward(inputs)))
        self.outputs = merge_output_specs(self.spec, probes)
        return self.outputs

    def label_of(self, label_id: int) -> str:
        """The label of a class index: the model's name for it, or the index itself."""
        labels = self.spec.labels
        return labels[label_id] if 0 <= label_id < len(labels) else str(label_id)

    # -- requests ---------------------------------------------------------------------------
    def need_task(self, *tasks: str) -> None:
        if self.spec.task not in tasks:
            raise InputError(f"model {self.name!r} serves {self.spec.task!r}, not {'/'.join(tasks)}; pick another model")

    def _check_length(self, tokens: int, what: str) -> None:
        if tokens > self.max_length:
            raise InputError(f"{what} is {tokens} tokens; model {self.name!r} takes at most {self.max_length}")

    def _tokens(self, texts: list[str], what: str) -> list[list[int]]:
        rows = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for i, row in enumerate(rows):
            self._check_length(len(row), f"{what}[{i}]")
        return rows

    async def embed(self, texts: list[str], timeout: float) -> np.ndarray:
        self.need_task("embed")
        rows = [("embed", r) for r in self._tokens(texts, "texts")]
        return np.stack(await asyncio.wait_for(self.batcher.submit(rows, len(rows)), timeout))

    async def classify(self, pairs: list[tuple[str, str | None]], timeout: float) -> list[Classification]:
        self.need_task("classify")
        if self.spec.pair_encoding == "separate":
            if any(b is None for _, b in pairs):
                raise InputError(f"model {self.name!r} compares two texts: send text and text_pair for every input")
            a = self._tokens([p[0] for p in pairs], "inputs.text")
            b = self._tokens([p[1] for p in pairs], "inputs.text_pair")
            rows = [("pair", (x, y)) for x, y in zip(a, b)]
        else:
            rows = []
            for i, (a, b) in enumerate(pairs):
                enc = self.tokenizer(a, b) if b is not None else self.tokenizer(a)
                self._check_length(len(enc["input_ids"]), f"inputs[{i}]")
                rows.append(("joint", (enc["input_ids"], enc.get("token_type_ids", [0] * len(enc["input_ids"])))))
        logits = np.stack(await asyncio.wait_for(self.batcher.submit(rows, len(rows)), timeout))
        return [Classification(row, int(row.argmax()), self.label_of(int(row.argmax()))) for row in logits]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, with the special tokens the model's own requests add."""
        return list(self._tokenizer()(texts, add_special_tokens=True)["input_ids"])

    def detokenize(self, rows: list[list[int]], skip_special_tokens: bool) -> list[str]:
        tokenizer = self._tokenizer()
        vocab = len(tokenizer)
        for i, row in enumerate(rows):
            bad = [t for t in row if t >= vocab]
            if bad:
                raise InputError(f"token_ids[{i}] holds ids {bad[:5]} outside the vocabulary of model {self.name!r} "
                                 f"(0..{vocab - 1})")
        return [tokenizer.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InputError(f"model {self.name!r} has no tokenizer; it takes raw tensors through Infer")
        return self.tokenizer

    async def infer(self, tensors: list[tuple[str, np.ndarray]], timeout: float) -> list[tuple[str, np.ndarray]]:
        """Named raw tensors through the model: (name, array) in, matched to the model's inputs by
        name or by position (signatures.order_inputs); (name, array) out, exactly the request's rows.
        Requests whose inputs share a batch dimension and the rest of their shapes are merged along
        dim 0 with their concurrent peers (dynamic batching)."""
        if not self.inputs:
            if self.spec.task == "generate":
                raise InputError(f"model {self.name!r} is a decoder: Infer would overwrite the KV cache its generations "
                                 "hold; use Generate (GetModel's rpcs lists what a model takes)")
            raise InputError(f"model {self.name!r} advertises no Infer signature; see GetModel's rpcs")
        ordered = order_inputs(self.name, [i.name for i in self.inputs], tensors)
        outputs = await self._infer(tuple(torch.from_numpy(t) for t in ordered), timeout)
        names = [o.name for o in self.outputs] if len(self.outputs) == len(outputs) else \
            [f"output_{i}" for i in range(len(outputs))]
        return list(zip(names, outputs))

    async def _infer(self, inputs: tuple[torch.Tensor, ...], timeout: float) -> list[np.ndarray]:
        rows = int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 0
        if 0 < rows < self.max_rows and all(t.dim() > 0 and t.shape[0] == rows for t in inputs):
            result = await asyncio.wait_for(self.infer_batcher.submit(inputs, rows), timeout)
            if isinstance(result, BaseException):  # this request's own error, found when it ran alone
                raise result
            return result
        return await self._forward(inputs, timeout)

    async def _forward(self, inputs: tuple[torch.Tensor, ...], timeout: float | None = None) -> list[np.ndarray]:
        """One forward on a ready replica; one lost meanwhile costs a second try on another replica,
        within the same `timeout` (default: the coordinator's call timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.pool.config.call_timeout_s if timeout is None else timeout)
        return _leaves(await self.pool.run(lambda handle: handle.forward(inputs, timeout=max(deadline - loop.time(), 1e-3)),
                                           deadline=deadline))

    async def _run_infer_batch(self, payloads: list[tuple[torch.Tensor, ...]]) -> list[Any]:
        groups: dict[tuple, list[int]] = {}
        for index, inputs in enumerate(payloads):
            key = tuple((tuple(t.shape[1:]), t.dtype) for t in inputs)
            groups.setdefault(key, []).append(index)
        results: list[Any] = [None] * len(payloads)
        for indices in groups.values():
            chunk, rows = [], 0
            for index in [*indices, None]:
                size = 0 if index is None else int(payloads[index][0].shape[0])
                if chunk and (index is None or rows + size > self.max_rows):
                    await self._infer_merged([payloads[i] for i in chunk], chunk, results)
                    chunk, rows = [], 0
                if index is not None:
                    chunk.append(index)
                    rows += size
        return results

    async def _infer_merged(self, group: list[tuple[torch.Tensor, ...]], indices: list[int], results: list[Any]) -> None:
        """One forward for requests of the same shape; outputs are split back by rows. An output
        without the batch rows, or a failure that may be one request's fault, runs them one by one."""
        sizes = [int(inputs[0].shape[0]) for inputs in group]
        if len(group) > 1:
            merged = tuple(torch.cat(parts) for parts in zip(*group))
            try:
                outputs = await self._forward(merged)
            except InputError:
                outputs = None
            if outputs is not None and all(o.ndim > 0 and o.shape[0] >= sum(sizes) for o in outputs):
                at = 0
                for index, size in zip(indices, sizes):
                    results[index] = [o[at : at + size] for o in outputs]
                    at += size
                return
        for index, size, inputs in zip(indices, sizes, group):
            try:
                outputs = await self._forward(inputs)
            except InputError as exc:
                results[index] = exc
                continue
            # the bucket kernel may have padded the batch: the request gets its own rows back
            if all(o.ndim > 0 and o.shape[0] >= size for o in outputs):
                outputs = [o[:size] for o in outputs]
            results[index] = outputs

    async def _run_batch(self, payloads: list[list[tuple[str, Any]]]) -> list[list[np.ndarray]]:
        rows = [row for payload in payloads for row in payload]
        outputs: list[np.ndarray] = []
        for start in range(0, len(rows), self.max_rows):
            chunk = rows[start : start + self.max_rows]
            result = await self._forward(_task_inputs(chunk))
            outputs.extend(result[0][: len(chunk)])
        split, at = [], 0
        for payload in payloads:
            split.append(outputs[at : at + len(payload)])
            at += len(payload)
        return split

    # -- Generate ---------------------------------------------------------------------------
    def draft_named(self, name: str, registry: Any) -> "ServedModel | str | None":
        """The draft a Generate request names: this model's fused draft, or "[ngram]" for n-gram
        lookup (its name, as a string: the ranks hold it, or no draft model is needed), else the
        served model of that name; None for no name."""
        if not name:
            return None
        return name if name in (self.fused_draft, NGRAM_DRAFT) else registry.get(name)

    async def generate(self, prompt: str, sampling: Sampling, draft: "ServedModel | None",
                       timeout: float) -> AsyncIterator[tuple[int | None, Any]]:
        """Stream (token id, text piece) pairs, then (None, GenerationStats).

        The request joins its replica's running batch at the next step (continuous batching). A
        client that goes away frees its slot at the next step.
        """
        self.need_task("generate")
        if isinstance(draft, ServedModel):
            draft.need_task("generate")
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        self._check_length(len(ids), "prompt")
        router = self.router  # every decoder has one (need_task above)
        waiting = router.waiting
        if waiting >= self.max_queue:
            raise Overloaded(f"model {self.name!r} has {waiting} generations waiting; retry later")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        generation = Generation(sampling.request(ids, self.tokenizer.eos_token_id),
                                draft.router if isinstance(draft, ServedModel) else draft)
        router.route(generation)
        started = loop.time()
        text = TextStream(self.tokenizer, sampling.stop)
        reason, first, summary = "", None, None
        try:
            while not reason:
                item = await asyncio.wait_for(generation.out.get(), max(0.0, deadline - loop.time()))
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Ended):  # the sequence finished
                    summary, reason = item.summary, item.summary.finish[0] or "length"
                    break
                first = first or loop.time() - started
                for token in item.tokens[0]:
                    for event in text.push(token):
                        yield event
                    if text.stopped:
                        reason = "stop"
                        break
            for event in text.finish():
                yield event
        finally:
            if summary is None:
                generation.scheduler.cancel(generation)  # where it runs now: it may have moved replicas
        if reason == "stop" and summary is None:  # the slot is freed at the next round, with the counts
            summary = await _summary_after_stop(generation, min(5.0, max(0.0, deadline - loop.time())))
        stats = GenerationStats.measure(
            prompt_tokens=len(ids), generated_tokens=len(text.tokens), finish_reasons=[reason],
            speculation=summary.speculation if summary is not None and draft is not None else None,
            first_token_s=first, total_s=loop.time() - started)
        reused = summary.reused_tokens if summary is not None else 0
        self.generations += 1
        self.prefix_hits += 1 if reused else 0
        self.prefix_reused_tokens += reused
        if self.metrics is not None:
            self.metrics.tokens.labels(self.name).inc(stats.generated_tokens)
            self.metrics.tokens_per_second.labels(self.name).set(stats.tokens_per_second)
            self.metrics.draft_proposed.labels(self.name).inc(stats.draft_tokens_proposed)
            self.metrics.draft_accepted.labels(self.name).inc(stats.draft_tokens_accepted)
            if reused:
                self.metrics.prefix_hits.labels(self.name).inc()
                self.metrics.prefix_reused_tokens.labels(self.name).inc(reused)
        yield None, stats

    async def close(self, release: bool = True) -> None:
        """Stop serving; `release` also unloads the replicas (resident ones otherwise stay loaded)."""
        await self.batcher.close()
        await self.infer_batcher.close()
        if self.router is not None:
            await self.router.close()
        await self.pool.close(release)


async def _summary_after_stop(generation: Generation, timeout: float) -> Any:
    try:
        while not isinstance(item := await asyncio.wait_for(generation.out.get(), timeout), Ended):
            if isinstance(item, BaseException):
                return None
        return item.summary
    except asyncio.TimeoutError:
        return None


def _task_inputs(rows: list[tuple[str, Any]]) -> tuple[torch.Tensor, ...]:
    """The forward's inputs for rows of one kind (see cluster.models.inputs)."""
    kind = rows[0][0]
    if kind == "embed":
        return embed_inputs([r[1] for r in rows])
    if kind == "pair":
        return pair_inputs([r[1][0] for r in rows], [r[1][1] for r in rows])
    return joint_inputs([r[1][0] for r in rows], [r[1][1] for r in rows])
