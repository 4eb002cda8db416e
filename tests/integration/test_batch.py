"""A batch job of a few thousand records, killed half way and run again: exactly one result per record."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cluster.models.bert import minilm_embedder, minilm_path

pytestmark = pytest.mark.integration
RECORDS = 2000


def write_input(path):
    words = "tensor parallel ranks serve resident shards behind a gateway on a ray cluster".split()
    rng = np.random.default_rng(0)
    with open(path, "w") as out:
        for i in range(RECORDS):
            out.write(json.dumps({"id": f"r{i}", "text": " ".join(rng.choice(words, size=rng.integers(2, 9)))}) + "\n")
            if i == 10:
                out.write("{not json\n")
            if i == 20:
                out.write(json.dumps({"text": "no id"}) + "\n")
            if i == 30:
                out.write(json.dumps({"id": "r5", "text": "a duplicate id"}) + "\n")


def _start(folder, tmp_path):
    cmd = [sys.executable, "-m", "actors.cli", "batch", "--model", f"embed={folder}", "--input", str(tmp_path / "in.jsonl"),
           "--output", str(tmp_path / "out.jsonl")]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.Popen(cmd, cwd=root, env={**os.environ, "PYTHONPATH": root}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_killed_job_resumes_exactly_once(minilm_tp2, tmp_path):
    folder = minilm_tp2["minilm-embed"]
    write_input(tmp_path / "in.jsonl")
    first = _start(folder, tmp_path)
    deadline = time.monotonic() + 240
    out = tmp_path / "out.jsonl"
    while not out.exists() or sum(1 for _ in open(out)) < RECORDS // 4:
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # its own session: the job and the Ray cluster it started
    first.wait(30)
    written_before = sum(1 for _ in open(out))
    assert written_before < RECORDS

    second = _start(folder, tmp_path)
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr[-3000:]
    assert "[batch]" in stderr and "records" in stderr  # progress in the logs
    counts = json.loads(stdout.strip().splitlines()[-1])
    assert counts["skipped"] >= written_before - 1

    check_exactly_once(tmp_path / "in.jsonl", out)


def check_exactly_once(input_path, out):
    """One result per good record, the three bad lines reported once each, embeddings as in-process."""
    results = [json.loads(line) for line in open(out)]
    ids = [r["id"] for r in results]
    assert sorted(ids) == sorted(f"r{i}" for i in range(RECORDS)) and len(ids) == len(set(ids))
    errors = [json.loads(line) for line in open(str(out) + ".errors")]
    assert sorted(e["line"] for e in errors) == [12, 23, 34]  # bad JSON, no id, duplicate id: each once

    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(input_path) if line.startswith('{"id"')}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    reference = minilm_embedder(tensor_parallel=False)[0]
    sample = results[:: RECORDS // 40]
    enc = tokenizer([texts[r["id"]] for r in sample], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[0].numpy()
    np.testing.assert_allclose(np.array([r["embedding"] for r in sample]), expected, atol=1e-4)
