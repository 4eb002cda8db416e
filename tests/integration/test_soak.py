"""A short soak (what CI runs): mixed good, bad, cancelled and over-deadline requests for ~20 s."""

import pytest

from actors.gateway.batching import BatchingConfig
from clients.soak import run_soak
from cluster.models.defaults import ensure_defaults
from tests.integration.harness import GatewayThread

pytestmark = pytest.mark.integration


def test_short_soak_has_no_crash_and_loses_nothing(ray_cluster, tmp_path):
    folders = ensure_defaults(tp_degree=2, batch_buckets=(1, 4), seq_buckets=(32,), root=tmp_path)
    served = GatewayThread(folders, batching=BatchingConfig(max_batch_rows=4, max_wait_s=0.005, max_queue=64))
    try:
        report = run_soak(served.target, {"embed": "minilm-embed", "classify": "minilm-paraphrase"}, clients=6, seconds=20)
    finally:
        served.close()
    assert report["crashes"] == 0, report["by_outcome"]
    assert report["lost"] == 0 and report["still_serving"]
    assert report["requests"] > 50
    outcomes = report["by_outcome"]
    assert outcomes.get("good:OK", 0) > 0 and outcomes.get("bad:INVALID_ARGUMENT", 0) > 0 and outcomes.get("bad:NOT_FOUND", 0) > 0
    assert set(k.split(":")[1] for k in outcomes) <= {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
