"""A short soak (what CI runs): 6 clients x 25 mixed good, bad, cancelled and over-deadline requests."""

import pytest

from actors.gateway.batching import BatchingConfig
from clients.soak import run_soak
from tests.integration.harness import GatewayThread

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # 150 requests from 6 clients


def test_short_soak_has_no_crash_and_loses_nothing(minilm_tp2):
    served = GatewayThread(minilm_tp2, batching=BatchingConfig(max_batch_rows=4, max_wait_s=0.005, max_queue=64))
    try:
        report = run_soak(served.target, {"embed": "minilm-embed", "classify": "minilm-paraphrase"}, clients=6,
                          per_client=25)
    finally:
        served.close()
    assert report["crashes"] == 0, report["by_outcome"]
    assert report["lost"] == 0 and report["still_serving"]
    assert report["requests"] == report["answered"] == 6 * 25
    outcomes = report["by_outcome"]
    assert [k for k in outcomes if k.startswith("good:")] == ["good:OK"], outcomes  # every good request answered OK
    assert outcomes.get("good:OK", 0) > 0 and outcomes.get("bad:INVALID_ARGUMENT", 0) > 0 and outcomes.get("bad:NOT_FOUND", 0) > 0
    assert set(k.split(":")[1] for k in outcomes) <= {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
