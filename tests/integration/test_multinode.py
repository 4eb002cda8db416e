"""A real two-node Ray cluster on loopback addresses: placement across nodes, a gateway that is killed
and restarted (attached through Ray Client) and finds its resident replicas, and a batch job through
Ray's Jobs API killed half way.

The head runs on 127.0.0.2 and a worker on 127.0.0.3 (Ray rewrites 127.0.0.1 to the outer address;
see FIELD-NOTES), each advertising 4 logical NeuronCores. Everything this module starts carries a
marker in its environment and is stopped by process id at the end.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.client import Client
from tests.support import RECORDS, REPO_ROOT, check_exactly_once, minilm_embeddings, write_input

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # starts a two-node Ray cluster of its own, gateway restarts, Ray jobs

HEAD, WORKER = "127.0.0.2", "127.0.0.3"
ROOT = REPO_ROOT
BIN = Path(sys.executable).parent
MARK = f"tpcluster-test-{uuid.uuid4().hex[:8]}"


def _port(host):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # not the test process's local-only cluster
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", TPCLUSTER_TEST_MARK=MARK)
    return env


def _start(args, log):
    return subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _marked_pids():
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"TPCLUSTER_TEST_MARK={MARK}".encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
    return pids


def _stop_everything(procs):
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in _marked_pids():  # what Ray started in other sessions (workers, job drivers)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _node(ip, gcs, extra, log):
    ports = [f"--dashboard-agent-listen-port={_port(ip)}", f"--dashboard-agent-grpc-port={_port(ip)}",
             f"--metrics-export-port={_port(ip)}", f"--runtime-env-agent-port={_port(ip)}"]
    return _start([str(BIN / "ray"), "start", "--block", f"--node-ip-address={ip}", "--num-cpus=2",
                   '--resources={"neuron_cores": 4}', "--disable-usage-stats", *ports, *extra], log)


def _wait_for_nodes(address, count, timeout=120):
    script = ("import ray, time, sys\nray.init(address=sys.argv[1], namespace='probe')\n"
              "deadline = time.time() + float(sys.argv[3])\n"
              "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]):\n"
              "    assert time.time() < deadline, ray.nodes()\n    time.sleep(0.5)\n")
    subprocess.run([sys.executable, "-c", script, address, str(count), str(timeout)], env=_env(), check=True,
                   timeout=timeout + 30, capture_output=True)


@pytest.fixture(scope="module")
def models(minilm_tp2, tmp_path_factory):
    """MiniLM at TP=2 and a small MLP at TP=1, traced on the test process's own cluster and saved."""
    from cluster.parallel_layers import ColumnParallelLinear, RowParallelLinear
    from cluster.trace import parallel_model_save, parallel_model_trace

    root = tmp_path_factory.mktemp("models")
    folders = {"embed": minilm_tp2["minilm-embed"]}

    def mlp():
        torch.manual_seed(4)
        model = torch.nn.Sequential(ColumnParallelLinear(8, 16, gather_output=False), RowParallelLinear(16, 4, input_is_parallel=True))
        return model.eval(), {}

    with parallel_model_trace(mlp, torch.ones(2, 8), tp_degree=1) as traced:
        parallel_model_save(traced, root / "mlp")
    folders["mlp"] = root / "mlp"
    return folders


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    gcs, dashboard, client = _port(HEAD), _port(HEAD), _port(HEAD)
    temp = tempfile.mkdtemp(prefix="/tmp/tpc-")  # Ray's socket paths must stay short
    procs = [_node(HEAD, gcs, ["--head", f"--port={gcs}", "--include-dashboard=true", f"--dashboard-host={HEAD}",
                               f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", f"--temp-dir={temp}"],
                   open(logs / "head.log", "w"))]
    try:
        _wait_for_nodes(f"{HEAD}:{gcs}", 1)
        procs.append(_node(WORKER, gcs, [f"--address={HEAD}:{gcs}"], open(logs / "worker.log", "w")))
        _wait_for_nodes(f"{HEAD}:{gcs}", 2)
        yield {"address": f"{HEAD}:{gcs}", "client": f"ray://{HEAD}:{client}", "jobs": f"http://{HEAD}:{dashboard}",
               "procs": procs, "logs": logs, "ray_logs": Path(temp) / "session_latest" / "logs"}
    finally:
        _stop_everything(procs)


def _serve(cluster, models, name, address):
    ready = cluster["logs"] / f"{name}.port"
    args = [str(BIN / "tpcluster"), "serve", "--address", address, "--replicas", "2", "--port", "0",
            "--ready-file", str(ready), *(f"--model={n}={f}" for n, f in models.items())]
    proc = _start(args, open(cluster["logs"] / f"{name}.log", "w"))
    cluster["procs"].append(proc)
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert proc.poll() is None, _tail(cluster["logs"] / f"{name}.log", *cluster["ray_logs"].glob("ray_client_server*.err"))
        assert time.monotonic() < deadline, "the gateway did not come up"
        time.sleep(0.5)
    return proc, f"127.0.0.1:{ready.read_text()}"


def _tail(*logs):
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)


def _replicas(client, model):
    status = next(m for m in client.status().models if m.name == model)
    return [(r.coordinator_pid, sorted({rank.node for rank in r.ranks}), r.ready) for r in status.replicas]


def test_replicas_spread_over_nodes_and_survive_a_gateway_restart(two_nodes, models):
    texts = ["replicas on two nodes", "the gateway restarts and finds them"]
    expected = minilm_embeddings(texts)

    gateway, target = _serve(two_nodes, models, "gateway1", two_nodes["address"])
    with Client(target, timeout=120) as client:
        embed = _replicas(client, "embed")
        assert [nodes for _, nodes, _ in embed] in ([[HEAD], [WORKER]], [[WORKER], [HEAD]])  # packed, and spread
        assert all(ready for _, _, ready in embed) and len(_replicas(client, "mlp")) == 2  # TP 2 and TP 1 share the cluster
        np.testing.assert_allclose(client.embed(texts, model="embed"), expected, atol=1e-4)
        mlp_out = client.infer("mlp", [np.ones((2, 8), np.float32)])[0]

    os.killpg(gateway.pid, signal.SIGKILL)  # no clean shutdown at all
    gateway.wait(10)
    _, target = _serve(two_nodes, models, "gateway2", two_nodes["client"])  # this one through Ray Client
    with Client(target, timeout=120) as client:
        assert _replicas(client, "embed") == embed  # the same coordinator processes: adopted, not reloaded
        for _ in range(4):  # both replicas answer
            np.testing.assert_allclose(client.embed(texts, model="embed"), expected, atol=1e-4)
        np.testing.assert_allclose(client.infer("mlp", [np.ones((2, 8), np.float32)])[0], mlp_out, atol=1e-6)


def test_job_submitted_through_the_jobs_api_resumes_exactly_once(two_nodes, models, tmp_path):
    """Runs on the named model the gateway keeps resident: the job adopts its replicas."""
    write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    cli = [str(BIN / "tpcluster")]
    submit = cli + ["submit", "--address", two_nodes["jobs"], "--model", "embed", "--input", str(tmp_path / "in.jsonl"),
                    "--output", str(out)]

    def job_status(job):
        return subprocess.run(cli + ["jobs", "status", job, "--address", two_nodes["jobs"]], env=_env(), check=True,
                              capture_output=True, text=True, timeout=60).stdout.strip()

    def wait_for(job, states, check=lambda: False, timeout=600):
        deadline = time.monotonic() + timeout
        while (state := job_status(job)) not in states and not check():
            assert time.monotonic() < deadline, f"job {job} is {state}"
            time.sleep(1.0)
        return state

    first = subprocess.run(submit, env=_env(), check=True, capture_output=True, text=True, timeout=120).stdout.strip()
    written = lambda: sum(1 for _ in open(out)) if out.exists() else 0  # noqa: E731
    state = wait_for(first, {"SUCCEEDED", "FAILED"}, check=lambda: written() >= RECORDS // 4)
    assert state not in ("SUCCEEDED", "FAILED"), "the job ended before it could be stopped half way"
    subprocess.run(cli + ["jobs", "stop", first, "--address", two_nodes["jobs"]], env=_env(), check=True, timeout=60)
    wait_for(first, {"STOPPED", "FAILED", "SUCCEEDED"})
    assert 0 < written() < RECORDS

    second = subprocess.run(submit, env=_env(), check=True, capture_output=True, text=True, timeout=120).stdout.strip()
    assert wait_for(second, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED"
    logs = subprocess.run(cli + ["jobs", "logs", second, "--address", two_nodes["jobs"]], env=_env(), check=True,
                          capture_output=True, text=True, timeout=60).stdout
    assert "resident replica" in logs and "records" in logs  # it used the gateway's model, and shows progress
    check_exactly_once(tmp_path / "in.jsonl", out)
