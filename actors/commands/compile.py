"""`tpcluster compile SRC --out DIR --tp N`: a Hugging Face checkpoint folder -> a saved model folder."""

from __future__ import annotations

import argparse


def buckets(text: str) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes separated by commas (1,4,16), got {text!r}") from None
    if not values or list(values) != sorted(set(values)) or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected increasing positive sizes (1,4,16), got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint folder: config.json, safetensors or .bin weights, tokenizer files")
    parser.add_argument("--out", required=True, help="the saved model folder to write (serve it with --model NAME=OUT)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (default 2)")
    parser.add_argument("--task", choices=("generate", "embed", "classify"), help="default: from the architecture")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--batch-buckets", type=buckets, default=(), metavar="1,4,16")
    parser.add_argument("--prompt-buckets", type=buckets, default=(), metavar="32,128", help="decoders: prompt lengths")
    parser.add_argument("--cache-buckets", type=buckets, default=(), metavar="256,512",
                        help="decoders: KV-cache lengths (the largest is the longest sequence)")
    parser.add_argument("--seq-buckets", type=buckets, default=(), metavar="32,128", help="encoders: input lengths")
    parser.add_argument("--max-sequences", type=int, default=0,
                        help="decoders: sequences decoded together (the largest batch bucket)")
    parser.add_argument("--verify-tokens", type=int, default=5,
                        help="decoders: tokens per speculative verification (k + 1; 0: no verify graphs)")
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="decoders: prefill prompts longer than this in chunks of this many tokens, up to the cache "
                             "(default: the largest prompt bucket; 0: none, prompts must fit a prompt bucket)")
    parser.add_argument("--address", help="Ray cluster to attach to; default: start a local one")
    parser.add_argument("--neuron-cores", type=int, help="logical NeuronCores of a local cluster without Neuron devices")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    import sys

    import ray

    import cluster
    from cluster.models.hub import CompileOptions, compile

    try:
        options = CompileOptions(task=args.task, dtype=args.dtype, batch_buckets=args.batch_buckets,
                                 prompt_buckets=args.prompt_buckets, cache_buckets=args.cache_buckets,
                                 seq_buckets=args.seq_buckets, max_sequences=args.max_sequences,
                                 verify_tokens=args.verify_tokens, chunk_tokens=args.chunk_tokens)
    except ValueError as exc:
        raise SystemExit(f"tpcluster compile: {exc}") from None
    progress = not args.quiet
    if progress:
        print(f"[tpcluster] compiling {args.src} at tp {args.tp} -> {args.out}", file=sys.stderr, flush=True)
    ours = not ray.is_initialized()  # a cluster this process already holds (a test's) stays up
    if ours and (args.address or args.neuron_cores):  # otherwise the trace starts a local one, after the checks
        cluster.init(address=args.address, neuron_cores=args.neuron_cores)
    try:
        summary = compile(args.src, args.out, args.tp, options, progress=progress, force=args.force)
    finally:
        if ours:
            cluster.shutdown()
    print(summary.describe())
    return 0
