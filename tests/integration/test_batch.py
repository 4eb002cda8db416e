"""A batch job of a few thousand records, killed half way and run again: exactly one result per record."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support import RECORDS, REPO_ROOT, check_exactly_once, write_input

pytestmark = pytest.mark.integration
def _start(folder, tmp_path):
    cmd = [sys.executable, "-m", "actors.cli", "batch", "--model", f"embed={folder}", "--input", str(tmp_path / "in.jsonl"),
           "--output", str(tmp_path / "out.jsonl")]
    root = str(REPO_ROOT)
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
