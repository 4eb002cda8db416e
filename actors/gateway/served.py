"""A model as the gateway serves it: replicas, tokenizer, batcher, and per-task request handling.

Text tasks (embed, classify) tokenize at submit time, so bad input is refused before it queues;
the batcher then merges rows from concurrent requests into one forward on the least busy ready
replica. Only token ids and output rows cross to the coordinator.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.gateway.batching import BatchingConfig, DynamicBatcher
from actors.gateway.scheduling import Generation, ReplicaScheduler
from cluster.errors import CoordinatorLost, InputError, ModelUnavailable, Overloaded, RankFailure
from cluster.serving import ServingSpec

log = logging.getLogger("tpcluster.gateway")


class TextStream:
    """Token ids to streamed text: each token carries the text that became final with it.

    Text that could still be the start of a stop sequence, or half a multi-byte character, is held
    back until the next token decides it, so a client never receives part of a stop sequence. The
    last token is held until the next one (or the end) so that it can carry what is still held.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.stopped = False
        self._sent = 0
        self._text = ""
        self._last: list[Any] | None = None  # [token, text] not yet handed out

    def push(self, token: int) -> list[tuple[int, str]]:
        self.tokens.append(token)
        self._text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [self._text.find(s) for s in self.stops if s in self._text]
        if hits:
            safe, self.stopped = min(hits), True
        elif self._text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            safe = self._sent
        else:
            safe = len(self._text) - self._held(self._text)
        safe = max(safe, self._sent)
        out = [tuple(self._last)] if self._last is not None else []
        self._last = [token, self._text[self._sent : safe]]
        self._sent = safe
        if self.stopped:
            out.append(tuple(self._last))
            self._last = None
        return out

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins a stop sequence."""
        return max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)

    def finish(self) -> list[tuple[int, str]]:
        """What is still held, with the last token (the sequence ended without a stop)."""
        if self._last is None:
            return []
        token, piece = self._last
        self._last = None
        if not self.stopped:
            piece += self._text[self._sent :].rstrip("\ufffd")
            self._sent = len(self._text)
        return [(token, piece)]


def _leaves(outputs: Any) -> list[np.ndarray]:
    leaves = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    return [t.detach().contiguous().numpy() for t in leaves]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class Replica:
    index: int
    coordinator: Any  # actors.coordinator_actor.RemoteCoordinator
    ready: bool = True
    in_flight: int = 0
    error: str = ""
    recoveries: int = 0
    recreating: Any = None  # the task recreating a lost coordinator
    adopted: bool = False  # a resident replica this gateway found loaded, rather than loaded itself


class ServedModel:
    def __init__(self, name: str, folder: Path | None, spec: ServingSpec, replicas: list[Replica],
                 batching: BatchingConfig, metrics: Any = None, resident: bool = False) -> None:
        self.name = name
        self.resident = resident  # replicas are named and detached: recreated under the same name
        self.folder = folder
        self.spec = spec
        self.replicas = replicas
        self.info = replicas[0].coordinator.info() if replicas else {}
        self.metrics = metrics
        self.tokenizer = None
        if spec.tokenizer and folder is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(folder / spec.tokenizer)
        self.max_length = spec.max_length or max(spec.seq_buckets, default=0)
        if spec.task == "generate" and not self.max_length:
            layout = (self.info.get("extra") or {}).get("decoder", {}).get("layout", {})
            self.max_length = max(layout.get("prompt_buckets", [0]))
        self.max_rows = max(spec.batch_buckets) if spec.batch_buckets else 1
        self.batcher = DynamicBatcher(name, self._run_batch, batching, concurrency=max(1, len(replicas)),
                                      on_batch=self.record_batch)
        self.call_timeout_s = replicas[0].coordinator._config.call_timeout_s if replicas else 60.0
        self.infer_batcher = DynamicBatcher(name, self._run_infer_batch, batching,
                                            concurrency=max(1, len(replicas)), on_batch=self.record_batch)
        self.schedulers: list[ReplicaScheduler] = []
        if spec.task == "generate":  # continuous batching: one scheduler per replica's KV cache
            layout = (self.info.get("extra") or {}).get("decoder", {}).get("layout", {})
            slots = max(layout.get("batch_buckets", [1]))
            slots = min(slots, batching.max_sequences) if batching.max_sequences else slots
            self.schedulers = [ReplicaScheduler(self, r, slots) for r in replicas]

    def record_batch(self, rows: int) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.labels(model=self.name).observe(rows)

    # -- metadata ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return any(r.ready for r in self.replicas)

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name, "task": self.spec.task, "tp_degree": self.info.get("tp_degree", 0),
            "backend": self.info.get("backend", ""), "buckets": self.info.get("buckets", []),
            "ready": self.ready, "replicas": len(self.replicas), "ready_replicas": sum(r.ready for r in self.replicas),
            "labels": list(self.spec.labels), "max_sequence_length": self.max_length,
        }

    # -- requests ---------------------------------------------------------------------------
    def _need_task(self, *tasks: str) -> None:
        if self.spec.task not in tasks:
            raise InputError(f"model {self.name!r} serves {self.spec.task!r}, not {'/'.join(tasks)}; pick another model")

    def _tokens(self, texts: list[str], what: str) -> list[list[int]]:
        rows = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for i, row in enumerate(rows):
            if len(row) > self.max_length:
                raise InputError(f"{what}[{i}] is {len(row)} tokens; model {self.name!r} takes at most {self.max_length}")
        return rows

    async def embed(self, texts: list[str], timeout: float) -> np.ndarray:
        self._need_task("embed")
        rows = [("embed", r) for r in self._tokens(texts, "texts")]
        return np.stack(await asyncio.wait_for(self.batcher.submit(rows, len(rows)), timeout))

    async def classify(self, pairs: list[tuple[str, str | None]], timeout: float) -> np.ndarray:
        self._need_task("classify")
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
                if len(enc["input_ids"]) > self.max_length:
                    raise InputError(f"inputs[{i}] is {len(enc['input_ids'])} tokens; model {self.name!r} takes at most {self.max_length}")
                rows.append(("joint", (enc["input_ids"], enc.get("token_type_ids", [0] * len(enc["input_ids"])))))
        return np.stack(await asyncio.wait_for(self.batcher.submit(rows, len(rows)), timeout))

    async def infer(self, tensors: list[np.ndarray], timeout: float) -> list[np.ndarray]:
        """Named raw tensors through the model. Requests whose inputs share a batch dimension and the
        rest of their shapes are merged along dim 0 with their concurrent peers (dynamic batching)."""
        self._need_task("infer", "embed", "classify")
        inputs = tuple(torch.from_numpy(t) for t in tensors)
        rows = int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 0
        if 0 < rows < self.max_rows and all(t.dim() > 0 and t.shape[0] == rows for t in inputs):
            result = await asyncio.wait_for(self.infer_batcher.submit(inputs, rows), timeout)
            if isinstance(result, BaseException):  # this request's own error, found when it ran alone
                raise result
            return result
        return _leaves(await self.call("forward", inputs, timeout=timeout))

    async def _run_infer_batch(self, payloads: list[tuple[torch.Tensor, ...]]) -> list[list[np.ndarray]]:
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
                outputs = _leaves(await self.call("forward", merged, timeout=self.call_timeout_s))
            except InputError:
                outputs = None
            if outputs is not None and all(o.ndim > 0 and o.shape[0] >= sum(sizes) for o in outputs):
                at = 0
                for index, size in zip(indices, sizes):
                    results[index] = [o[at : at + size] for o in outputs]
                    at += size
                return
        for index, inputs in zip(indices, group):
            try:
                results[index] = _leaves(await self.call("forward", inputs, timeout=self.call_timeout_s))
            except InputError as exc:
                results[index] = exc

    async def generate(self, prompt: str, sampling: Any, draft: "ServedModel | None", timeout: float):
        """Stream (token id, text piece) pairs, then a final stats dict.

        The request joins its replica's running batch at the next step (continuous batching). A
        client that goes away frees its slot at the next step.
        """
        from cluster.generation.engine import GenerationRequest
        from cluster.generation.sampling import SamplingParams

        self._need_task("generate")
        if draft is not None:
            draft._need_task("generate")
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(ids) > self.max_length:
            raise InputError(f"prompt is {len(ids)} tokens; model {self.name!r} takes at most {self.max_length}")
        params = SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed)
        request = GenerationRequest((tuple(ids),), sampling.max_new_tokens, params, self.tokenizer.eos_token_id,
                                    sampling.speculation_length)
        waiting = sum(len(s.waiting) for s in self.schedulers)
        if waiting >= self.batcher.config.max_queue:
            raise Overloaded(f"model {self.name!r} has {waiting} generations waiting; retry later")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        generation = Generation(request, draft)
        scheduler = self.route(generation)
        started = loop.time()
        text = TextStream(self.tokenizer, sampling.stop)
        reason, first, summary = "", None, {}
        try:
            while not reason:
                item = await asyncio.wait_for(generation.out.get(), max(0.0, deadline - loop.time()))
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, dict):  # the summary: the sequence finished
                    summary, reason = item, (item.get("finish") or ["length"])[0] or "length"
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
            if not summary:
                scheduler.cancel(generation)
        if reason == "stop" and not summary:  # the slot is freed at the next round, with the counts
            summary = await self._summary_after_stop(generation, min(5.0, max(0.0, deadline - loop.time())))
        elapsed = loop.time() - started
        spec = summary.get("speculation") or {}
        if self.metrics is not None:
            self.metrics.tokens.labels(self.name).inc(len(text.tokens))
            self.metrics.tokens_per_second.labels(self.name).set(len(text.tokens) / elapsed if elapsed else 0)
            self.metrics.draft_proposed.labels(self.name).inc(spec.get("proposed", 0))
            self.metrics.draft_accepted.labels(self.name).inc(spec.get("accepted", 0))
        yield None, {
            "prompt_tokens": len(ids), "generated_tokens": len(text.tokens), "finish_reason": reason,
            "draft_tokens_proposed": int(spec.get("proposed", 0)), "draft_tokens_accepted": int(spec.get("accepted", 0)),
            "acceptance_rate": float(spec.get("acceptance_rate", 0.0)), "mean_accepted_length": float(spec.get("mean_accepted_length", 0.0)),
            "time_to_first_token_ms": (first or 0.0) * 1e3, "total_ms": elapsed * 1e3,
            "tokens_per_second": len(text.tokens) / elapsed if elapsed else 0.0,
        }

    @staticmethod
    async def _summary_after_stop(generation: Generation, timeout: float) -> dict:
        try:
            while not isinstance(item := await asyncio.wait_for(generation.out.get(), timeout), dict):
                if isinstance(item, BaseException):
                    return {}
            return item
        except asyncio.TimeoutError:
            return {}

    def generations_on(self, replica: Replica) -> int:
        return sum(len(s.active) for s in self.schedulers if s.replica is replica)

    @property
    def queue_depth(self) -> int:
        return self.batcher.depth + self.infer_batcher.depth + sum(len(s.waiting) for s in self.schedulers)

    def route(self, generation: Generation) -> ReplicaScheduler:
        """Queue a generation on the least loaded ready replica (not one lent out as a draft)."""
        ready = [s for s in self.schedulers if s.replica.ready and s.lent_to is None] or \
            [s for s in self.schedulers if s.replica.ready]
        if not ready:
            error = ModelUnavailable(f"model {self.name!r} has no ready replica right now; retry shortly")
            generation.out.put_nowait(error)
            raise error
        scheduler = min(ready, key=lambda s: s.load)
        scheduler.submit(generation)
        return scheduler

    # -- batches ----------------------------------------------------------------------------
    async def _run_batch(self, payloads: list[list[tuple[str, Any]]]) -> list[list[np.ndarray]]:
        rows = [row for payload in payloads for row in payload]
        outputs: list[np.ndarray] = []
        for start in range(0, len(rows), self.max_rows):
            chunk = rows[start : start + self.max_rows]
            result = await self.call("forward", self._tensors(chunk), timeout=self.replicas[0].coordinator._config.call_timeout_s)
            outputs.extend(result[0][: len(chunk)].detach().numpy())
        split, at = [], 0
        for payload in payloads:
            split.append(outputs[at : at + len(payload)])
            at += len(payload)
        return split

    @staticmethod
    def _pad(seqs: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(seqs), length, dtype=torch.long)
        mask = torch.zeros(len(seqs), length, dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        return ids, mask

    def _tensors(self, rows: list[tuple[str, Any]]) -> tuple[torch.Tensor, ...]:
        kind = rows[0][0]
        if kind == "embed":
            seqs = [r[1] for r in rows]
            ids, mask = self._pad(seqs, max(map(len, seqs)))
            return ids, mask, torch.zeros_like(ids)
        if kind == "pair":
            a, b = [r[1][0] for r in rows], [r[1][1] for r in rows]
            length = max(max(map(len, a)), max(map(len, b)))
            ids_a, mask_a = self._pad(a, length)
            ids_b, mask_b = self._pad(b, length)
            return ids_a, mask_a, torch.zeros_like(ids_a), ids_b, mask_b, torch.zeros_like(ids_b)
        seqs, types = [r[1][0] for r in rows], [r[1][1] for r in rows]
        length = max(map(len, seqs))
        ids, mask = self._pad(seqs, length)
        type_ids = torch.zeros_like(ids)
        for i, t in enumerate(types):
            type_ids[i, : len(t)] = torch.tensor(t)
        return ids, mask, type_ids

    # -- replicas ---------------------------------------------------------------------------
    def pick_replica(self) -> Replica:
        ready = [r for r in self.replicas if r.ready]
        if not ready:
            raise ModelUnavailable(f"model {self.name!r} has no ready replica right now; retry shortly")
        return min(ready, key=lambda r: r.in_flight)

    async def call(self, method: str, *args: Any, timeout: float) -> Any:
        return await self._on(self.pick_replica(), method, *args, timeout=timeout)

    async def _on(self, replica: Replica, method: str, *args: Any, timeout: float) -> Any:
        """One call on one replica; a lost rank or coordinator takes the replica out of rotation at once."""
        replica.in_flight += 1
        try:
            return await replica.coordinator.call_async(method, *args, timeout=timeout)
        except (ModelUnavailable, RankFailure) as exc:
            self.lost(replica, exc)
            raise ModelUnavailable(f"model {self.name!r} replica {replica.index}: {_first_line(exc)}") from None
        finally:
            replica.in_flight -= 1

    def lost(self, replica: Replica, exc: Exception) -> None:
        if replica.ready:
            log.warning("model %s replica %d lost: %s", self.name, replica.index, _first_line(exc))
        replica.ready, replica.error = False, _first_line(exc)
        if isinstance(exc, CoordinatorLost) and replica.recreating is None and self.folder is not None:
            replica.recreating = asyncio.get_running_loop().create_task(self._recreate(replica))

    def _load_again(self, index: int) -> Any:
        from actors.coordinator_actor import coordinator_name
        from cluster.trace import parallel_model_load

        return parallel_model_load(self.folder, name=coordinator_name(self.name, index) if self.resident else None)

    async def _recreate(self, replica: Replica) -> None:
        """Load the replica again from its saved model (its coordinator died, and its ranks with it)."""
        delay = 1.0
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, replica.coordinator.close)  # frees what the dead coordinator held
        try:
            while True:
                try:
                    model = await loop.run_in_executor(None, self._load_again, replica.index)
                    replica.coordinator, replica.ready, replica.error = model._coordinator, True, ""
                    replica.recoveries += 1
                    log.warning("model %s replica %d recreated", self.name, replica.index)
                    return
                except Exception as exc:  # capacity may come back: keep trying
                    replica.error = f"recreating: {_first_line(exc)}"
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
        finally:
            replica.recreating = None

    async def check_health(self, timeout: float = 10.0) -> bool:
        for replica in self.replicas:
            if replica.recreating is not None:
                continue
            try:
                await replica.coordinator.call_async("health", timeout=timeout)
                if not replica.ready:
                    replica.recoveries += 1  # the coordinator rebuilt its ranks
                    log.warning("model %s replica %d ready again", self.name, replica.index)
                replica.ready, replica.error = True, ""
            except (ModelUnavailable, RankFailure) as exc:
                self.lost(replica, exc)
            except asyncio.TimeoutError:  # busy (a long generation step), not lost: a failure shows as an error
                log.info("model %s replica %d: health check timed out (busy)", self.name, replica.index)
            except Exception as exc:  # any other failure: do not route requests here
                replica.ready, replica.error = False, _first_line(exc)
        return self.ready

    async def close(self, release: bool = True) -> None:
        """Stop serving; `release` also unloads the replicas (resident ones otherwise stay loaded)."""
        await self.batcher.close()
        await self.infer_batcher.close()
        for scheduler in self.schedulers:
            await scheduler.close()
        for replica in self.replicas:
            if replica.recreating is not None:
                replica.recreating.cancel()
            if release:
                replica.coordinator.close()
