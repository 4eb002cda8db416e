"""The `tpcluster` command."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_demo(args: argparse.Namespace) -> int:
    """Trace the embedded MiniLM at TP=2 on a local cluster and embed the guide's sentences."""
    import torch
    from transformers import AutoTokenizer

    import cluster
    from clients.bench import SENTENCES
    from cluster.models.bert import minilm_embedder, minilm_path

    cluster.init()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    buckets = [16, 64]
    config = cluster.trace.BucketModelConfig(lambda: cluster.sequence_bucket_kernel(buckets, num_inputs=3))
    examples = []
    for length in buckets:
        enc = tokenizer(["x"], max_length=length, padding="max_length", return_tensors="pt")
        examples.append((enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    with cluster.trace.parallel_model_trace(minilm_embedder, examples, tp_degree=args.tp, inline_weights_to_neff=False,
                                            bucket_config=config, progress=True) as model:
        embeddings = []
        for sentence in SENTENCES:
            enc = tokenizer([sentence], return_tensors="pt")
            embeddings.append(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[0][0])
        info = model.info()
    emb = torch.stack(embeddings)
    sims = emb @ emb.T
    result = {
        "model": "all-MiniLM-L6-v2 (embedded)", "tp_degree": info["tp_degree"], "buckets": buckets,
        "sentences": SENTENCES, "embedding_dim": emb.shape[1],
        "cosine": {"0~2 (paraphrase)": round(float(sims[0, 2]), 4), "0~1": round(float(sims[0, 1]), 4), "1~2": round(float(sims[1, 2]), 4)},
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"all-MiniLM-L6-v2 at TP={info['tp_degree']} on {info['tp_degree']} rank actors, buckets {buckets}")
        for i, s in enumerate(SENTENCES):
            print(f"  [{i}] {s}  -> {emb.shape[1]}-d embedding, |e|={float(emb[i].norm()):.3f}")
        for pair, value in result["cosine"].items():
            print(f"  cosine {pair}: {value:.3f}")
    cluster.shutdown()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from clients import bench

    results = bench.run(args.only, args.repeats, args.json, args.chart)
    print(json.dumps(results, indent=1) if args.print_json else results["summary"])
    if not args.print_json:
        print(f"machine: {results['machine']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpcluster", description="Tensor-parallel models resident on a Ray cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="trace the embedded MiniLM at TP=2 and embed the guide's sentences")
    demo.add_argument("--tp", type=int, default=2)
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser("bench", help="measure against in-process baselines (ratios)")
    bench.add_argument("--only", nargs="*", choices=["core", "separation", "buckets", "trace_once"])
    bench.add_argument("--repeats", type=int, default=30)
    bench.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    bench.add_argument("--chart", metavar="PATH", help="write a PNG chart of the ratios")
    bench.add_argument("--print-json", action="store_true", help="print the JSON instead of the one-line summary")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line for the user; details with TPCLUSTER_DEBUG=1
        from cluster.errors import ClusterError

        if isinstance(exc, ClusterError) and not os.environ.get("TPCLUSTER_DEBUG"):
            print(f"tpcluster: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
