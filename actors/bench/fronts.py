"""The `fronts` section: what the Open Inference Protocol and the OpenAI HTTP API add to one Embed
call over tpcluster.v1 (issue 16's goal: <= 1 ms p50 each).

One gateway, started in this process as the other serving sections start theirs, serves the saved
MiniLM embedder over gRPC and, with `http_port`, the OpenAI-compatible HTTP API. A child process
embeds the same short text through each front with that front's own client: tpcluster.v1 with
`clients.client.Client`, the Open Inference Protocol's ModelInfer with Triton's `tritonclient.grpc`,
and OpenAI's `POST /v1/embeddings` with the `openai` package (one kept-alive connection). The same
request also goes through the standard library's `http.client` on one kept-alive connection: what the
HTTP front costs without the `openai` package's own work (its request building and response models).

A child process because tritonclient's generated `inference.*` messages and the gateway's own
(clients/protocol/grpc_predict_v2_pb2.py) share their full names, and one protobuf descriptor pool
holds each name once (see tests/integration/triton.py). Every client runs there, so each pays the
same process and scheduling costs. The fronts take turns call by call, the order rotating each round,
after a warm-up, so machine noise hits all of them alike. Each call is timed in the child around the
client call, decoding the vector included.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from actors.bench.inputs import SENTENCES
from actors.bench.measure import percentiles_ms

MODEL = "minilm-embed"
BASELINE = "tpcluster_v1"
FRONTS = (BASELINE, "open_inference_protocol", "openai_http", "openai_http_stdlib")
GOAL_ADDED_P50_MS = 1.0
WARMUP_ROUNDS = 20


def bench_fronts(results: dict[str, Any], repeats: int) -> None:
    """p50/p99 of one Embed call through each front against one gateway, 10 x `repeats` calls each,
    interleaved; each front's added p50 over tpcluster.v1, and how far the vectors differ."""
    from actors.gateway.app import BackgroundGateway, ServeConfig
    from actors.gateway.server import GatewayConfig
    from cluster.models.defaults import ensure_defaults

    calls, text = 10 * repeats, SENTENCES[0]
    served = BackgroundGateway(ServeConfig(models={MODEL: ensure_defaults()[MODEL]}, http_port=0,
                                           gateway=GatewayConfig(port=0)))
    try:
        measured = _run_clients(served.target, served.http_url, text, calls)
    finally:
        served.close()
    out: dict[str, Any] = {
        "setup": f"MiniLM embedder TP=2, default batching, one gateway (gRPC + OpenAI HTTP); 1 text "
                 f"({len(text)} chars), {calls} sequential calls per front after {WARMUP_ROUNDS} warm-up rounds, "
                 "fronts interleaved; clients: clients.client.Client, tritonclient.grpc, openai, http.client, in one child process",
        **compare_fronts(measured["samples_ms"], BASELINE),
        **vector_agreement(measured["vectors"], BASELINE),
    }
    out["within_goal"] = all(out[f]["added_p50_ms"] <= GOAL_ADDED_P50_MS for f in FRONTS if f != BASELINE)
    results["fronts"] = out


def compare_fronts(samples_ms: Mapping[str, Sequence[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Per front: calls, p50/p90/p99 in ms, its p50 and p99 over the baseline front's (added ms, and
    the p50 ratio), and the median of its calls' differences from the baseline's call of the same
    round (samples are in round order), which cancels load that drifts from round to round."""
    rounds = samples_ms[baseline]
    base = percentiles_ms(list(rounds))
    out = {}
    for name, samples in samples_ms.items():
        if len(samples) != len(rounds):
            raise ValueError(f"front {name!r} has {len(samples)} calls and {baseline!r} {len(rounds)}; "
                             "each round times one call of every front")
        p = percentiles_ms(list(samples))
        out[name] = {"calls": len(samples), **p, "added_p50_ms": p["p50_ms"] - base["p50_ms"],
                     "added_p99_ms": p["p99_ms"] - base["p99_ms"], "p50_ratio": p["p50_ms"] / base["p50_ms"],
                     "paired_added_p50_ms": statistics.median(a - b for a, b in zip(samples, rounds))}
    return out


def vector_agreement(vectors: Mapping[str, Sequence[float]], baseline: str) -> dict[str, float]:
    """The largest absolute difference of each front's vector from the baseline front's, and over all."""
    base = vectors[baseline]
    diffs = {}
    for name, vector in vectors.items():
        if len(vector) != len(base):
            raise ValueError(f"front {name!r} returned {len(vector)} numbers, {baseline!r} {len(base)}")
        if name != baseline:
            diffs[f"{name}_max_abs_diff"] = max(abs(a - b) for a, b in zip(vector, base))
    return {**diffs, "max_abs_diff": max(diffs.values(), default=0.0)}


def _run_clients(target: str, http_url: str, text: str, calls: int) -> dict[str, Any]:
    """`measure_fronts` in a child interpreter (see the module docstring); what it printed, decoded."""
    script = "import json, sys; from actors.bench.fronts import measure_fronts; " \
             "print(json.dumps(measure_fronts(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))"
    root = Path(__file__).resolve().parents[2]  # the folder holding actors/ and clients/
    done = subprocess.run([sys.executable, "-c", script, target, http_url, text, str(calls)], capture_output=True,
                          text=True, timeout=600, cwd=root, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the fronts' client process exited with {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_fronts(target: str, http_url: str, text: str, calls: int) -> dict[str, Any]:
    """Runs in the child: `calls` timed Embed calls of `text` per front, interleaved, after a warm-up;
    returns {"samples_ms": {front: [ms, ...]} in round order, "vectors": {front: the last vector}}.
    Never call this beside the gateway (the module docstring says why)."""
    with contextlib.ExitStack() as stack:
        calls_by_front = _front_calls(stack, target, http_url, text)
        samples: dict[str, list[float]] = {name: [] for name in FRONTS}
        vectors: dict[str, list[float]] = {}
        for round_ in range(WARMUP_ROUNDS + calls):
            shift = round_ % len(FRONTS)
            for name in FRONTS[shift:] + FRONTS[:shift]:
                started = time.perf_counter()
                vectors[name] = calls_by_front[name]()
                if round_ >= WARMUP_ROUNDS:
                    samples[name].append((time.perf_counter() - started) * 1e3)
    return {"samples_ms": samples, "vectors": vectors}


def _front_calls(stack: contextlib.ExitStack, target: str, http_url: str, text: str) -> dict[str, Callable[[], list[float]]]:
    """One Embed call of `text` per front, each returning the vector; the clients close with `stack`."""
    import base64
    import http.client
    import urllib.parse

    import numpy as np
    import openai
    import tritonclient.grpc as triton

    from clients.client import Client

    grpc_client = stack.enter_context(Client(target, timeout=60))
    openai_client = stack.enter_context(openai.OpenAI(base_url=http_url, api_key="unused", max_retries=0, timeout=60))
    oip_client = triton.InferenceServerClient(target)
    stack.callback(oip_client.close)
    url = urllib.parse.urlsplit(http_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)  # one request, one write
    stack.callback(connection.close)
    # the request the openai package sends by default: base64 float32 vectors
    body = json.dumps({"model": MODEL, "input": [text], "encoding_format": "base64"}).encode()

    def oip() -> list[float]:
        tensor = triton.InferInput("text", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([text], dtype=object))
        return oip_client.infer(MODEL, [tensor]).as_numpy("embedding")[0].tolist()

    def stdlib_http() -> list[float]:
        connection.request("POST", f"{url.path}/embeddings", body, {"content-type": "application/json"})
        reply = connection.getresponse()
        encoded = json.loads(reply.read())["data"][0]["embedding"]
        return np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist()

    return {
        BASELINE: lambda: grpc_client.embed([text], model=MODEL)[0].tolist(),
        "open_inference_protocol": oip,
        "openai_http": lambda: list(openai_client.embeddings.create(model=MODEL, input=[text]).data[0].embedding),
        "openai_http_stdlib": stdlib_http,
    }
