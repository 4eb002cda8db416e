"""Batch jobs: run a JSONL file of records through a served model, exactly once, resumable.

Input lines are JSON objects with an "id" and, by the model's task, "text" (embed; or "texts"),
"text" + "text_pair" (classify), or "prompt" (generate). Results are appended to the output file as
{"id": ..., ...} lines, flushed per batch; a run stopped or killed half way and started again with
the same output skips every id already written (a torn last line is discarded and redone), so the
final output has exactly one result per input record. A malformed line goes to the errors file
with its line number and does not stop the job. Progress (done, rate, ETA) is logged to stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from cluster.errors import ClusterError, InputError


def _done_ids(path: Path) -> set[str]:
    """Ids already written; a torn final line (killed mid-write) is cut off so it is redone."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    done = set()
    for line in data[:keep].splitlines():
        if line.strip():
            done.add(str(json.loads(line)["id"]))
    return done


def _records(path: Path, errors: Any, skip_errors: set[int]) -> Iterator[tuple[int, str, dict]]:
    seen: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "id" not in record:
                    raise ValueError('each line must be a JSON object with an "id"')
                key = str(record["id"])
                if key in seen:
                    raise ValueError(f"duplicate id {key!r}")
                seen.add(key)
            except ValueError as exc:
                if number not in skip_errors:
                    errors.write(json.dumps({"line": number, "error": str(exc)}) + "\n")
                    errors.flush()
                continue
            yield number, key, record


async def _run_one(model: Any, record: dict, timeout: float) -> dict:
    task = model.spec.task
    if task == "embed":
        texts = record.get("texts") or [record.get("text", "")]
        vectors = await model.embed([str(t) for t in texts], timeout)
        return {"embedding": vectors[0].tolist()} if "texts" not in record else {"embeddings": vectors.tolist()}
    if task == "classify":
        result = (await model.classify([(str(record.get("text", "")), record.get("text_pair"))], timeout))[0]
        return {"label": result.label, "logits": result.logits.tolist()}
    if task == "generate":
        from actors.gateway.codec import Sampling
        from cluster.generation.defaults import DEFAULTS

        sampling = Sampling(max_new_tokens=int(record.get("max_new_tokens") or DEFAULTS.max_new_tokens))
        text = ""
        async for token, piece in model.generate(str(record.get("prompt", "")), sampling, None, timeout):
            if token is not None:
                text += piece
        return {"text": text}
    raise InputError(f"batch jobs run embed, classify or generate models, not {task!r}")


async def run_batch(model: Any, input_path: Path, output_path: Path, errors_path: Path, window: int = 64,
                    log_every_s: float = 5.0, record_timeout_s: float = 600.0) -> dict[str, int]:
    """Process every record of input_path not yet in output_path through `model` (a ServedModel);
    a record not done within `record_timeout_s` goes to the errors file."""
    done = _done_ids(output_path)
    skip_errors = set()
    if errors_path.exists():
        skip_errors = {json.loads(line)["line"] for line in errors_path.read_text().splitlines() if line.strip()}
    total = sum(1 for line in open(input_path, encoding="utf-8", errors="replace") if line.strip())
    counts = {"total": total, "skipped": len(done), "written": 0, "failed": 0}
    started = time.monotonic()
    last_log = started
    with open(output_path, "a", encoding="utf-8") as out, open(errors_path, "a", encoding="utf-8") as errors:
        pending: list[tuple[int, str, asyncio.Task]] = []

        async def drain() -> None:
            nonlocal last_log
            for number, key, task in pending:
                try:
                    result = await task
                    out.write(json.dumps({"id": key, **result}) + "\n")
                    counts["written"] += 1
                except (ClusterError, ValueError) as exc:
                    errors.write(json.dumps({"line": number, "id": key, "error": str(exc).splitlines()[0]}) + "\n")
                    counts["failed"] += 1
            out.flush()
            os.fsync(out.fileno())
            errors.flush()
            pending.clear()
            now = time.monotonic()
            if now - last_log >= log_every_s:
                last_log = now
                finished = counts["written"] + counts["failed"]
                rate = finished / (now - started)
                left = total - counts["skipped"] - finished
                print(f"[batch] {counts['skipped'] + finished}/{total} records, {rate:.1f}/s, ETA {left / rate if rate else 0:.0f} s",
                      file=sys.stderr, flush=True)

        for number, key, record in _records(input_path, errors, skip_errors):
            if key in done:
                continue
            pending.append((number, key, asyncio.ensure_future(_run_one(model, record, record_timeout_s))))
            if len(pending) >= window:  # concurrent records share forwards through the model's batcher
                await drain()
        await drain()
    print(f"[batch] finished: {counts}", file=sys.stderr, flush=True)
    return counts
