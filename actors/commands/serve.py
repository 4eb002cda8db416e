"""`tpcluster serve`: saved models (or the embedded defaults) behind the gRPC gateway.

A --model folder may also be a Hugging Face checkpoint: it is compiled at --tp on first use and
cached under TPCLUSTER_CACHE, keyed by its files' content (cluster.models.hub.ensure_compiled).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", metavar="NAME=PATH",
                        help="a saved model folder, or a Hugging Face checkpoint folder (compiled on first use, then "
                             "cached) (repeatable)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree of checkpoints compiled here (default 2)")
    parser.add_argument("--address", help="Ray cluster to attach to (auto, ray://host:10001); default: start a local one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/embeddings) on this port")
    parser.add_argument("--draft", action="append", metavar="TARGET=DRAFT",
                        help="HTTP API: the draft TARGET's completions speculate with when they send speculation_length "
                             "without draft_model (repeatable)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics over HTTP (0: off)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of every model")
    parser.add_argument("--spare-ranks", type=int, default=0,
                        help="hot spare rank processes per replica, a NeuronCore each: a lost rank is replaced "
                             "in seconds (cpu backend)")
    parser.add_argument("--compile-graphs", action="store_true",
                        help="cpu backend: compile every rank graph to machine code at load (AOTInductor, needs g++; "
                             "9-25 s a graph the first time on a machine, cached after; a decode step ~1.5-2x faster)")
    parser.add_argument("--neuron-cores", type=int, help="logical NeuronCores of a local cluster without Neuron devices")
    parser.add_argument("--max-batch", type=int, default=16, help="rows per dynamic batch")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    parser.add_argument("--max-queue", type=int, default=256, help="queued requests per model before RESOURCE_EXHAUSTED")
    parser.add_argument("--max-sequences", type=int, default=0,
                        help="Generate: sequences decoded together per replica (default: every KV-cache slot)")
    parser.add_argument("--no-batching", action="store_true", help="one request per forward, one sequence per replica")
    parser.add_argument("--auth-token-file", help="require 'authorization: Bearer <token>' with this token")
    parser.add_argument("--tls-cert", help="server certificate (PEM)")
    parser.add_argument("--tls-key", help="server private key (PEM)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds to finish in-flight requests on shutdown")
    parser.add_argument("--ready-file", help="write the bound port here once serving")
    parser.add_argument("--resident", action=argparse.BooleanOptionalAction, default=None,
                        help="keep replicas loaded after exit and adopt resident ones at start "
                             "(default: on with --address, off on a local cluster)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request as JSON")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from actors.gateway.app import ServeConfig, serve_forever
    from actors.gateway.batching import BatchingConfig
    from actors.gateway.server import GatewayConfig

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    models = {}
    for item in args.model or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model takes NAME=PATH, got {item!r}")
        models[name] = path
    drafts = {}
    for item in args.draft or []:
        target, sep, draft = item.partition("=")
        if not sep or not target or not draft:
            raise SystemExit(f"--draft takes TARGET=DRAFT (two served model names), got {item!r}")
        drafts[target] = draft
    compile_checkpoints(models, args)
    read = lambda path: open(path, "rb").read() if path else None  # noqa: E731
    token = open(args.auth_token_file).read().strip() if args.auth_token_file else None
    batching = BatchingConfig(max_batch_rows=1 if args.no_batching else args.max_batch, max_wait_s=0 if args.no_batching else args.max_wait_ms / 1e3,
                              max_queue=args.max_queue, max_sequences=1 if args.no_batching else args.max_sequences)
    config = ServeConfig(
        models=models, replicas=args.replicas, spare_ranks=args.spare_ranks, compile_graphs=args.compile_graphs,
        address=args.address, neuron_cores=args.neuron_cores, batching=batching,
        resident=args.resident, http_port=args.http_port, drafts=drafts,
        gateway=GatewayConfig(host=args.host, port=args.port, metrics_port=args.metrics_port, auth_token=token,
                              tls_cert=read(args.tls_cert), tls_key=read(args.tls_key), grace_s=args.grace),
    )
    asyncio.run(serve_forever(config, ready_file=args.ready_file))
    return 0


def compile_checkpoints(models: dict[str, str], args: argparse.Namespace) -> None:
    """Replace every checkpoint folder in `models` by its compiled folder (compiling it on first use)."""
    import sys

    from cluster.models.hub import ensure_compiled, is_checkpoint

    checkpoints = {name: path for name, path in models.items() if is_checkpoint(path)}
    if not checkpoints:
        return
    import cluster

    cluster.init(address=args.address, neuron_cores=args.neuron_cores)
    try:
        for name, path in checkpoints.items():
            models[name] = str(ensure_compiled(path, tp_degree=args.tp, progress=True))
            print(f"tpcluster: {name}: checkpoint {path} -> compiled folder {models[name]}", file=sys.stderr, flush=True)
    except BaseException:
        cluster.shutdown()
        raise
