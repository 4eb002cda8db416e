"""Chaos: kill a rank, then a coordinator, by process id in the middle of a Generate stream.

The stream ends with UNAVAILABLE, the other replica serves throughout, the lost replica rebuilds
(or is recreated) and the model then answers correctly again; no rank is left holding a core.
"""

import os
import signal
import time

import pytest
import ray

from clients import errors
from clients.client import Client
from cluster.models.defaults import build_decoder
from cluster.models.pair import pair_path
from tests.integration.harness import GatewayThread
from tests.integration.test_gateway_generate import PAIR_VOCAB, PROMPT
from tests.support import TINY_TARGET, save_random_llama

pytestmark = pytest.mark.integration
LAYOUT = dict(batch_buckets=(1,), prompt_buckets=(16,), cache_buckets=(256,), verify_tokens=0)


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    save_random_llama(root / "t", 0, PAIR_VOCAB, **TINY_TARGET)
    build_decoder(root / "t", root / "model", 2, LAYOUT, pair_path(), "model")
    gateway = GatewayThread({"model": root / "model"}, replicas=2)
    yield gateway
    gateway.close()


def _busy_replica(client):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for replica in client.status().models[0].replicas:
            if replica.in_flight and replica.ranks:
                return replica
        time.sleep(0.05)
    raise AssertionError("no replica reported the running generation")


def _wait_recovered(client, expected, recoveries_before):
    deadline = time.monotonic() + 30
    while True:
        try:
            answer = client.generate(PROMPT, model="model", max_new_tokens=12).token_ids
            replicas = client.status().models[0].replicas
            if all(r.ready for r in replicas) and sum(r.recoveries for r in replicas) > recoveries_before:
                return answer
        except errors.Unavailable:
            pass
        assert time.monotonic() < deadline, "the model did not recover within 30 s"
        time.sleep(0.5)


@pytest.mark.parametrize("victim", ["rank", "coordinator"])
def test_kill_during_generate(served, victim):
    with Client(served.target, timeout=60, retries=0) as client, Client(served.target, timeout=60, retries=0) as other:
        expected = client.generate(PROMPT, model="model", max_new_tokens=12).token_ids
        before = sum(r.recoveries for r in client.status().models[0].replicas)
        stream = client.generate_stream(PROMPT, model="model", max_new_tokens=230)
        assert next(stream).HasField("token")
        replica = _busy_replica(other)
        pid = replica.ranks[1].pid if victim == "rank" else replica.coordinator_pid
        os.kill(pid, signal.SIGKILL)
        # UNAVAILABLE, not DEADLINE_EXCEEDED: the stream learns of the loss, it does not wait out its deadline
        with pytest.raises(errors.Unavailable, match="replica"):
            for _ in stream:
                pass
        assert other.generate(PROMPT, model="model", max_new_tokens=12).token_ids == expected  # the other replica
        assert _wait_recovered(other, expected, before) == expected
    deadline = time.monotonic() + 30
    while ray.available_resources().get("neuron_cores", 0) != ray.cluster_resources()["neuron_cores"] - 4:
        assert time.monotonic() < deadline, f"cores not returned: {ray.available_resources()}"
        time.sleep(0.5)
