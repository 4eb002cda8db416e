"""The benchmark's one-line summary and its chart of ratios."""

from __future__ import annotations

from typing import Any


def summary(results: dict[str, Any]) -> str:
    parts = []
    if "long" in results:
        lo = results["long"]
        parts.append(f"long prompts: TTFT reused/not x{lo['reuse_ttft_ratio']:.2f} ({lo['ttft_reused_ms']:.0f} vs "
                     f"{lo['ttft_not_reused_ms']:.0f} ms); ITL p99 {lo['itl_alone']['p99_ms']:.0f} ms alone, "
                     f"{lo['itl_with_long_prompts_joining']['p99_ms']:.0f} ms with long prompts joining; "
                     f"decode at context 416 x{lo['long_context_decode_ratio']:.2f} of 32")
    if "scale" in results:
        s, m = results["scale"], results["scale"]["model"]
        parts.append(f"{s['shape']} TP=2 {s['dtype']} ({m['checkpoint_gb']:.2f} GB): host memory over the checkpoint, less "
                     "the processes' fixed cost: " + ", ".join(f"{phase} x{m[phase]['over_checkpoint']:.2f}" for phase in
                                                               ("compile", "ready", "generate", "rebuild"))
                     + f"; decode x{s['decode_ratio_to_transformers']:.2f} of transformers")
    if "core" in results:
        c = results["core"]
        parts.append(f"eager {c['eager_in_process']['p50_ms']:.1f} ms, TP1 x{c['tp1']['ratio_to_eager']:.2f}, TP2 x{c['tp2']['ratio_to_eager']:.2f}")
    if "separation" in results:
        s = results["separation"]
        parts.append(f"separated/inlined bytes x{s['bytes_ratio']:.2f} load x{s['load_ratio']:.2f}")
    if "buckets" in results:
        parts.append(f"16 tokens, buckets[128,512]/single[512] x{results['buckets']['ratio']:.2f}")
    if "trace_once" in results:
        t = results["trace_once"]
        parts.append("trace once/per-rank " + ", ".join(f"TP{tp} x{t[f'tp{tp}_once_over_per_rank']:.2f}" for tp in (1, 2, 4)))
    if "decoder" in results:
        d = results["decoder"]
        fused = [f"fused_k{k}" for k in (2, 4, 6)] + ["fused_adaptive"]
        parts.append(f"decode target-only {d['target_only_tok_s']:.0f} tok/s; speculative/target-only, separate draft "
                     + ", ".join(f"k{k} x{d[f'speculative_k{k}_over_target_only']:.2f}" for k in (2, 4, 6))
                     + f", adaptive x{d['speculative_adaptive_over_target_only']:.2f}; fused draft "
                     + ", ".join(f"{label.removeprefix('fused_')} x{d[f'{label}_over_target_only']:.2f}" for label in fused)
                     + f"; best vs HF assisted x{max(d[f'{label}_over_hf_assisted'] for label in fused):.2f}"
                     + (f"; n-gram k4 x{d['ngram_k4_over_target_only']:.2f}, adaptive x{d['ngram_adaptive_over_target_only']:.2f}"
                        f" (vs HF prompt lookup x{d['ngram_k4_over_hf_prompt_lookup']:.2f})" if "ngram_k4" in d else ""))
    if "step" in results:
        s = results["step"]
        parts.append("decode/HF generate " + ", ".join(
            f"TP{tp} x{s[f'tp{tp}']['over_hf_generate']:.2f} (compiled graphs x{s[f'tp{tp}']['compiled_over_hf_generate']:.2f}; "
            f"step {s[f'tp{tp}']['step_ms']:.1f} ms, "
            f"overhead {s[f'tp{tp}']['hops_and_bookkeeping_ms']:.1f} ms)" for tp in (1, 2))
            + f"; gateway stream/library x{s['gateway_over_library']:.2f}")
    if "gateway" in results:
        g = results["gateway"]
        parts.append(f"gateway +{g['gateway_added_p50_ms']:.1f} ms p50; batching gain at 32 clients x{g['classify_32_clients_batching_gain']:.2f}")
    if "generate" in results:
        g = results["generate"]
        parts.append("Generate continuous batching gain at 1/8/32 clients "
                     + "/".join(f"x{g[f'generate_{c}_clients_batching_gain']:.2f}" for c in (1, 8, 32))
                     + "; speculating (fused, adaptive) over not "
                     + "/".join(f"x{g[f'generate_{c}_clients_speculation_gain']:.2f}" for c in (1, 8, 32))
                     + ("; n-gram over not " + "/".join(f"x{g[f'generate_{c}_clients_ngram_gain']:.2f}" for c in (1, 8, 32))
                        if "generate_1_clients_ngram_gain" in g else ""))
    if "batch" in results:
        parts.append(f"batch job x{results['batch']['batch_job_over_loop']:.2f} records/s of an in-process loop")
    if "soak" in results:
        s = results["soak"]
        parts.append(f"soak {s['requests']} requests, {s['crashes']} crashes, {s['lost']} lost, p99 {s['good_p99_ms']:.0f} ms")
    if "fronts" in results:
        f = results["fronts"]
        parts.append(f"Embed p50 tpcluster.v1 {f['tpcluster_v1']['p50_ms']:.2f} ms, added by "
                     + ", ".join(f"{label} {f[name]['added_p50_ms']:+.2f} ms (x{f[name]['p50_ratio']:.2f}, paired {f[name]['paired_added_p50_ms']:+.2f})"
                                 for name, label in (("open_inference_protocol", "OIP"), ("openai_http", "OpenAI HTTP"),
                                                     ("openai_http_stdlib", "OpenAI HTTP via http.client")))
                     + f" (goal <= 1 ms: {'met' if f['within_goal'] else 'missed'}); vectors differ by <= {f['max_abs_diff']:.1e}")
    if "compile" in results:
        c = results["compile"]
        parts.append(f"Serve a checkpoint: first start {c['first_start_s']:.1f} s (compile {c['compile_s']:.1f} s), "
                     f"second start {c['second_start_s']:.1f} s (load {c['second']['load_s']:.1f} s of {c['graphs']} graphs; "
                     f"x{c['second_over_first']:.2f} of the first; goal <= x0.3: "
                     f"{'met' if c['within_goal'] else 'missed'}); same tokens: {'yes' if c['same_tokens'] else 'NO'}")
    if "failover" in results:
        parts.append(failover_summary(results["failover"]))
    if "serving" in results:
        parts.append(serving_summary(results["serving"]))
    return "; ".join(parts)


def serving_summary(s: dict[str, Any]) -> str:
    """The serving section in one clause: vLLM's output tok/s, then each of our servers' tok/s, TTFT p50,
    TPOT p50 and whole-request latency p50 over vLLM's at every concurrency measured (its own tok/s where vLLM has no figure); failures."""
    if "skipped" in s:
        return f"serving skipped: {s['skipped']}"
    levels = sorted({c for runs in s["servers"].values() for c in runs}, key=int)

    def tok_s(label: str) -> str:
        return _per_level(levels, {c: r.get("output_tok_s") for c, r in s["servers"].get(label, {}).items()}, "{:.0f}")

    parts = [f"serving (vllm bench serve, concurrency {'/'.join(levels)}): vLLM {tok_s('vllm')} tok/s"]
    for label in s["servers"]:
        ratios = s["over_vllm"].get(label)
        if ratios:
            parts.append(f"{label.removeprefix('tpcluster_')} over vLLM " + ", ".join(
                f"{name} {_per_level(levels, {c: r[key] for c, r in ratios.items()}, 'x{:.2f}')}"
                for name, key in (("tok/s", "output_tok_s"), ("TTFT p50", "ttft_p50_ms"), ("TPOT p50", "tpot_p50_ms"),
                                  ("E2E p50", "e2el_p50_ms"))))
        elif label != "vllm":
            parts.append(f"{label.removeprefix('tpcluster_')} {tok_s(label)} tok/s")
    failed = [f"{label} ({error[:80]})" for label, error in s.get("errors", {}).items()]
    return "; ".join(parts) + (f"; failed: {', '.join(failed)}" if failed else "")


def _per_level(levels: list[str], figures: dict[str, float | None], fmt: str) -> str:
    """One figure per concurrency level, '/'-separated; '-' where there is none."""
    return "/".join("-" if figures.get(c) is None else fmt.format(figures[c]) for c in levels)


def failover_summary(f: dict[str, Any]) -> str:
    """The failover section in one clause: load, kills and rebuilds, failures, streams, p99s, memory."""
    failures = ", ".join(f"{code} {n}" for code, n in f["failures_by_status"].items()) or "none"
    rebuilds = f["rebuild_s"]
    rebuilt = f", rebuilt in {min(rebuilds):.0f}-{max(rebuilds):.0f} s" if rebuilds else ""
    p99 = "/".join(f"{f['latency_ms'][rpc]['p99_ms']:.0f}" for rpc in ("embed", "classify", "generate") if rpc in f["latency_ms"])
    growth = f["memory_growth_mb"]
    return (f"failover {f['seconds'] / 60:.1f} min, {f['kills_done']} rank kills ({f['rebuilds_observed']} rebuilds{rebuilt}): "
            f"{f['requests']} requests, {f['failed']} failed ({failures}); {f['streams_mismatching']} of "
            f"{f['streams_compared']} greedy streams differ ({f['tokens_lost']} lost, {f['tokens_duplicated']} duplicated, "
            f"{f['tokens_changed']} changed tokens); p99 embed/classify/generate {p99} ms; memory growth gateway "
            f"{growth['gateway_process']:+.0f} MB, ranks {growth['ranks_total']:+.0f} MB")


def chart(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float]] = []
    if "core" in results:
        bars += [("TP=1 latency", results["core"]["tp1"]["ratio_to_eager"]), ("TP=2 latency", results["core"]["tp2"]["ratio_to_eager"])]
    if "separation" in results:
        bars += [("separated bytes", results["separation"]["bytes_ratio"]), ("separated load", results["separation"]["load_ratio"])]
    if "buckets" in results:
        bars.append(("16 tok, 2 buckets", results["buckets"]["ratio"]))
    if "trace_once" in results:
        bars += [(f"trace once TP={tp}", results["trace_once"][f"tp{tp}_once_over_per_rank"]) for tp in (1, 2, 4)]
    if "decoder" in results:
        bars += [(f"speculative k={k}: time/token vs target-only", 1 / results["decoder"][f"speculative_k{k}_over_target_only"]) for k in (2, 4, 6)]
        bars += [(f"fused draft, {label}: time/token vs target-only", 1 / results["decoder"][f"fused_{label}_over_target_only"])
                 for label in ("k4", "adaptive")]
    if "step" in results:
        bars += [(f"decode TP={tp}: time/token vs transformers generate", 1 / results["step"][f"tp{tp}"]["over_hf_generate"])
                 for tp in (1, 2)]
    if "gateway" in results:
        bars.append(("Classify, 32 clients: time/request, batching on vs off", 1 / results["gateway"]["classify_32_clients_batching_gain"]))
    if "generate" in results:
        bars.append(("Generate, 32 clients: time/token, batching on vs off", 1 / results["generate"]["generate_32_clients_batching_gain"]))
        bars += [(f"Generate, {c} clients: time/token, speculating vs not", 1 / results["generate"][f"generate_{c}_clients_speculation_gain"])
                 for c in (1, 32)]
    if "batch" in results:
        bars.append(("batch job: time/record vs in-process loop", 1 / results["batch"]["batch_job_over_loop"]))
    if "fronts" in results:
        bars += [(f"Embed p50 via {label} vs tpcluster.v1", results["fronts"][name]["p50_ratio"])
                 for name, label in (("open_inference_protocol", "Open Inference Protocol"), ("openai_http", "OpenAI HTTP"))]
    if "compile" in results:
        bars.append(("serve a checkpoint: second start vs first (compile cache)", results["compile"]["second_over_first"]))
    if "serving" in results and "over_vllm" in results["serving"]:
        for label, by_level in results["serving"]["over_vllm"].items():
            top = max(by_level, key=int)
            if by_level[top]["output_tok_s"]:
                bars.append((f"vllm bench serve, {label}, {top} clients: time/token vs vLLM", 1 / by_level[top]["output_tok_s"]))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color="#4477aa")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("ratio to the same run's baseline (lower is better)")
    ax.set_title(f"tpcluster bench ({results['machine']})", fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
