"""The `fronts` benchmark section's arithmetic: percentiles, added latency over tpcluster.v1, vector
agreement, and the summary line (issue 16)."""

import pytest

from actors.bench.fronts import compare_fronts, vector_agreement
from actors.bench.measure import percentiles_ms
from actors.bench.report import summary


def test_percentiles_are_the_median_and_nearest_rank_below():
    samples = [float(ms) for ms in range(100, 0, -1)]  # 1..100 ms, unordered
    assert percentiles_ms(samples) == {"p50_ms": 50.5, "p90_ms": 90.0, "p99_ms": 99.0}
    assert percentiles_ms([3.0]) == {"p50_ms": 3.0, "p90_ms": 3.0, "p99_ms": 3.0}
    with pytest.raises(ValueError, match="no latency samples"):
        percentiles_ms([])


def test_each_front_is_compared_with_the_baseline_front():
    base = [10.0, 11.0, 12.0, 13.0, 50.0]
    got = compare_fronts({"tpcluster_v1": base, "oip": [x + 0.5 for x in base], "http": [x * 2 for x in base]},
                         "tpcluster_v1")
    assert got["tpcluster_v1"] == {"calls": 5, "p50_ms": 12.0, "p90_ms": 13.0, "p99_ms": 13.0, "added_p50_ms": 0.0,
                                   "added_p99_ms": 0.0, "p50_ratio": 1.0, "paired_added_p50_ms": 0.0}
    assert got["oip"]["added_p50_ms"] == pytest.approx(0.5) and got["oip"]["p50_ratio"] == pytest.approx(12.5 / 12)
    assert got["oip"]["paired_added_p50_ms"] == pytest.approx(0.5)
    assert got["http"]["p50_ms"] == 24.0 and got["http"]["added_p50_ms"] == 12.0 and got["http"]["added_p99_ms"] == 13.0
    assert got["http"]["p50_ratio"] == 2.0 and got["http"]["paired_added_p50_ms"] == 12.0


def test_paired_differences_see_through_stalls_that_hit_the_fronts_unequally():
    # the front is 1 ms slower than the baseline in the same round, but 40 ms stalls land on
    # three of its rounds and on two of the baseline's: the unpaired p50s differ by 41 ms
    base = [10.0, 50.0, 50.0, 10.0, 10.0]
    front = [51.0, 11.0, 51.0, 51.0, 11.0]
    got = compare_fronts({"tpcluster_v1": base, "front": front}, "tpcluster_v1")["front"]
    assert got["added_p50_ms"] == 41.0 and got["paired_added_p50_ms"] == 1.0
    with pytest.raises(ValueError, match="each round times one call of every front"):
        compare_fronts({"tpcluster_v1": [1.0, 2.0], "front": [1.0]}, "tpcluster_v1")


def test_vector_agreement_is_the_largest_difference_from_the_baseline():
    got = vector_agreement({"tpcluster_v1": [0.5, -0.25, 1.0], "oip": [0.5, -0.25, 1.0], "http": [0.5, -0.5, 1.125]},
                           "tpcluster_v1")
    assert got == {"oip_max_abs_diff": 0.0, "http_max_abs_diff": 0.25, "max_abs_diff": 0.25}
    with pytest.raises(ValueError, match="returned 2 numbers"):
        vector_agreement({"tpcluster_v1": [0.0, 1.0, 2.0], "oip": [0.0, 1.0]}, "tpcluster_v1")


def test_the_summary_line_names_each_fronts_added_p50():
    fronts = compare_fronts({"tpcluster_v1": [10.0], "open_inference_protocol": [10.25], "openai_http": [11.5],
                             "openai_http_stdlib": [10.5]}, "tpcluster_v1")
    line = summary({"fronts": {**fronts, "max_abs_diff": 0.0, "within_goal": False}})
    assert line == ("Embed p50 tpcluster.v1 10.00 ms, added by OIP +0.25 ms (x1.02, paired +0.25), "
                    "OpenAI HTTP +1.50 ms (x1.15, paired +1.50), OpenAI HTTP via http.client +0.50 ms (x1.05, paired +0.50) "
                    "(goal <= 1 ms: missed); vectors differ by <= 0.0e+00")
