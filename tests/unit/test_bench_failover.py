"""The `failover` benchmark section's arithmetic: token differences of a stream from its undisturbed
run, stream totals around kills, failures by status, memory growth and the summary line (issue 15)."""

from actors.bench.failover import compare_streams, failures_by_status, memory_growth, token_diff
from actors.bench.report import summary

REFERENCE = [5, 6, 7, 8, 9, 10]


def test_an_identical_stream_differs_in_nothing():
    assert token_diff(REFERENCE, list(REFERENCE)) == {"lost": 0, "duplicated": 0, "changed": 0}


def test_lost_duplicated_and_changed_tokens_are_told_apart():
    assert token_diff(REFERENCE, [5, 6, 8, 9, 10]) == {"lost": 1, "duplicated": 0, "changed": 0}
    assert token_diff(REFERENCE, [5, 6, 7, 7, 8, 9, 10]) == {"lost": 0, "duplicated": 1, "changed": 0}
    assert token_diff(REFERENCE, [5, 6, 70, 8, 9, 10]) == {"lost": 0, "duplicated": 0, "changed": 1}
    assert token_diff(REFERENCE, [5, 6, 7]) == {"lost": 3, "duplicated": 0, "changed": 0}  # a stream cut short
    # a replaced run longer than the one it replaces: the overlap changed, the rest is extra
    assert token_diff(REFERENCE, [5, 6, 1, 2, 3, 9, 10]) == {"lost": 0, "duplicated": 1, "changed": 2}


def test_streams_are_totalled_and_those_running_across_a_kill_counted():
    same = {"lost": 0, "duplicated": 0, "changed": 0}
    streams = [(0.0, 2.0, same), (3.0, 6.0, {"lost": 1, "duplicated": 0, "changed": 0}),
               (4.0, 5.0, same), (7.0, 9.0, {"lost": 0, "duplicated": 2, "changed": 3})]
    assert compare_streams(streams, kill_times=[4.5]) == {
        "streams_compared": 4, "streams_mismatching": 2, "streams_across_a_kill": 2,
        "streams_mismatching_across_a_kill": 1, "tokens_lost": 1, "tokens_duplicated": 2, "tokens_changed": 3}
    assert compare_streams([], kill_times=[1.0])["streams_compared"] == 0


def test_failures_are_counted_by_status_over_every_rpc():
    outcomes = {"embed:OK": 10, "embed:UNAVAILABLE": 2, "generate:UNAVAILABLE": 1, "classify:DEADLINE_EXCEEDED": 3,
                "generate:OK": 4, "embed:CLIENT_TimeoutError": 1}
    assert failures_by_status(outcomes) == {"CLIENT_TimeoutError": 1, "DEADLINE_EXCEEDED": 3, "UNAVAILABLE": 3}
    assert failures_by_status({"embed:OK": 5}) == {}


def test_memory_growth_is_end_minus_start_of_what_both_have():
    assert memory_growth({"gateway_process": 900.0, "ranks_total": 4000.0, "gone": 1.0},
                         {"gateway_process": 950.5, "ranks_total": 3990.0}) == {"gateway_process": 50.5, "ranks_total": -10.0}


def test_the_summary_line_reports_failures_streams_and_memory():
    failover = {
        "seconds": 600.0, "kills_done": 10, "rebuilds_observed": 10, "rebuild_s": [8.2, 14.9], "requests": 3000,
        "failed": 2, "failures_by_status": {"UNAVAILABLE": 2}, "streams_compared": 500, "streams_mismatching": 1,
        "tokens_lost": 0, "tokens_duplicated": 0, "tokens_changed": 3,
        "latency_ms": {"embed": {"p99_ms": 120.4}, "classify": {"p99_ms": 150.0}, "generate": {"p99_ms": 9000.0}},
        "memory_growth_mb": {"gateway_process": 40.2, "ranks_total": -12.0},
    }
    assert summary({"failover": failover}) == (
        "failover 10.0 min, 10 rank kills (10 rebuilds, rebuilt in 8-15 s): 3000 requests, 2 failed (UNAVAILABLE 2); "
        "1 of 500 greedy streams differ (0 lost, 0 duplicated, 3 changed tokens); p99 embed/classify/generate "
        "120/150/9000 ms; memory growth gateway +40 MB, ranks -12 MB")
    failover.update(failures_by_status={}, failed=0, rebuild_s=[])
    assert "0 failed (none)" in summary({"failover": failover}) and "rebuilt in" not in summary({"failover": failover})
