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
    """The main job: a local cluster, the embedded models at TP=2 behind a real gateway, real client calls."""
    import numpy as np

    import cluster
    from actors.gateway.app import BackgroundGateway, ServeConfig
    from actors.gateway.server import GatewayConfig
    from clients.bench import SENTENCES
    from clients.client import Client

    print("starting a local cluster and the gateway on the embedded models (first run traces them: ~1-2 min)", file=sys.stderr)
    served = BackgroundGateway(ServeConfig(neuron_cores=args.neuron_cores, gateway=GatewayConfig(port=args.port)))
    try:
        with Client(served.target) as client:
            models = client.list_models()
            vectors = client.embed(SENTENCES, model="minilm-embed")
            sims = vectors @ vectors.T
            pairs = [(SENTENCES[0], SENTENCES[2]), (SENTENCES[0], SENTENCES[1]), (SENTENCES[1], SENTENCES[2])]
            labels = client.classify(pairs, model="minilm-paraphrase")
            generations = {}
            if "pair-target" in {m.name for m in models}:
                for label, draft in (("target only", ""), ("speculative, draft pair-draft, k=4", "pair-draft")):
                    generations[label] = client.generate("The for statement is used to", model="pair-target", max_new_tokens=40,
                                                         draft_model=draft, speculation_length=4 if draft else 0)
            status = client.status()
    finally:
        served.close()
        cluster.shutdown()
    result = {
        "gateway": served.target,
        "models": {m.name: {"task": m.task, "tp_degree": m.tp_degree, "buckets": len(m.buckets)} for m in models},
        "ranks": {m.name: [f"rank {r.rank} pid {r.pid} neuron_cores {r.neuron_cores}" for rep in m.replicas for r in rep.ranks]
                  for m in status.models},
        "embeddings": {"dim": int(vectors.shape[1]), "norms": [round(float(n), 4) for n in np.linalg.norm(vectors, axis=1)]},
        "cosine": {"0~2 (paraphrase)": round(float(sims[0, 2]), 4), "0~1": round(float(sims[0, 1]), 4), "1~2": round(float(sims[1, 2]), 4)},
        "classify": [{"pair": list(p), "label": r.label, "logits": [round(x, 3) for x in r.logits]} for p, r in zip(pairs, labels)],
        "generate": {label: {"text": g.text, "tokens": g.stats.generated_tokens, "tokens_per_second": round(g.stats.tokens_per_second, 1),
                             "acceptance_rate": round(g.stats.acceptance_rate, 3)} for label, g in generations.items()},
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    described = ", ".join(f"{name} ({info['task']}, TP={info['tp_degree']})" for name, info in result["models"].items())
    print(f"gateway {served.target} served {described}")
    for name, ranks in result["ranks"].items():
        print(f"  {name}: " + "; ".join(ranks))
    print("Embed (all-MiniLM-L6-v2, mean pooling + L2 norm, from the package's pooling config):")
    for i, s in enumerate(SENTENCES):
        print(f"  [{i}] {s}")
    for pair, value in result["cosine"].items():
        print(f"  cosine {pair}: {value:.3f}")
    print("Classify (paraphrase detection):")
    for item in result["classify"]:
        print(f"  {item['label']:10}  {item['pair'][0]!r} / {item['pair'][1]!r}")
    for label, g in result["generate"].items():
        extra = f", acceptance {g['acceptance_rate']:.2f}" if g["acceptance_rate"] else ""
        print(f"Generate (shipped pair, {label}; {g['tokens']} tokens, {g['tokens_per_second']:.0f} tok/s{extra}):")
        print(f"  The for statement is used to{g['text']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from clients import bench

    results = bench.run(args.only, args.repeats, args.json, args.chart, soak=(args.soak_clients, args.soak_seconds))
    print(json.dumps(results, indent=1) if args.print_json else results["summary"])
    if not args.print_json:
        print(f"machine: {results['machine']}")
    return 0


def _client(args: argparse.Namespace):
    from clients.client import Client

    token = open(args.token_file).read().strip() if args.token_file else os.environ.get("TPCLUSTER_TOKEN")
    certs = open(args.ca_file, "rb").read() if args.ca_file else None
    return Client(args.target, token=token, root_certificates=certs, timeout=args.timeout)


def _print(args: argparse.Namespace, data, text: str) -> None:
    print(json.dumps(data, indent=1) if args.json else text)


def cmd_serve(args: argparse.Namespace) -> int:
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
    read = lambda path: open(path, "rb").read() if path else None  # noqa: E731
    token = open(args.auth_token_file).read().strip() if args.auth_token_file else None
    batching = BatchingConfig(max_batch_rows=1 if args.no_batching else args.max_batch, max_wait_s=0 if args.no_batching else args.max_wait_ms / 1e3,
                              max_queue=args.max_queue, max_sequences=1 if args.no_batching else args.max_sequences)
    config = ServeConfig(
        models=models, replicas=args.replicas, address=args.address, neuron_cores=args.neuron_cores, batching=batching,
        resident=args.resident,
        gateway=GatewayConfig(host=args.host, port=args.port, metrics_port=args.metrics_port, auth_token=token,
                              tls_cert=read(args.tls_cert), tls_key=read(args.tls_key), grace_s=args.grace),
    )
    asyncio.run(serve_forever(config, ready_file=args.ready_file))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        models = client.list_models()
    rows = [MessageToDict(m, preserving_proto_field_name=True) for m in models]
    _print(args, rows, "\n".join(f"{m.name:24} {m.task:9} tp={m.tp_degree} replicas={m.ready_replicas}/{m.replicas} "
                                   f"{'ready' if m.ready else 'NOT READY'}" for m in models))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        status = client.status()
    lines = [f"gateway {status.gateway_version}"]
    for m in status.models:
        lines.append(f"{m.name} ({m.task}, tp={m.tp_degree}, queue {m.queue_depth})")
        for r in m.replicas:
            lines.append(f"  replica {r.index}: {'ready' if r.ready else 'NOT READY ' + r.error}")
            for rank in r.ranks:
                lines.append(f"    rank {rank.rank}: node {rank.node} neuron_cores {rank.neuron_cores or '-'} pid {rank.pid} "
                             f"rss {rank.memory_bytes / 2**20:.0f} MiB")
    _print(args, MessageToDict(status, preserving_proto_field_name=True), "\n".join(lines))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        state = client.health(args.service or "")
    _print(args, {"service": args.service or "", "status": state}, state)
    return 0 if state == "SERVING" else 2


def cmd_embed(args: argparse.Namespace) -> int:
    with _client(args) as client:
        vectors = client.embed(args.texts, model=args.model)
    _print(args, {"embeddings": vectors.tolist()},
           "\n".join(f"[{i}] {len(v)}-d  {' '.join(f'{x:+.3f}' for x in v[:6])} ..." for i, v in enumerate(vectors)))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    inputs = [tuple(args.texts[:2])] if len(args.texts) == 2 and not args.single else list(args.texts)
    with _client(args) as client:
        results = client.classify(inputs, model=args.model)
    _print(args, [{"label": r.label, "label_id": r.label_id, "logits": list(r.logits)} for r in results],
           "\n".join(f"{r.label} (logits {', '.join(f'{x:.3f}' for x in r.logits)})" for r in results))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        kwargs = dict(model=args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, stop=args.stop or (), draft_model=args.draft or "",
                      speculation_length=args.k)
        if args.stream and not args.json:
            print(args.prompt, end="", flush=True)
            for event in client.generate_stream(args.prompt, **kwargs):
                if event.HasField("token"):
                    print(event.token.text, end="", flush=True)
                else:
                    s = event.stats
                    print(f"\n[{s.generated_tokens} tokens, {s.tokens_per_second:.1f} tok/s, {s.finish_reason}"
                          + (f", acceptance {s.acceptance_rate:.2f}" if s.draft_tokens_proposed else "") + "]")
            return 0
        result = client.generate(args.prompt, **kwargs)
    from dataclasses import asdict

    _print(args, {"text": result.text, "token_ids": result.token_ids, "stats": asdict(result.stats) if result.stats else None},
           args.prompt + result.text)
    return 0


def _batch_model(spec: str, address: str | None):
    """A ServedModel for a batch job: the resident replicas named NAME (a gateway's, on a cluster),
    else NAME=PATH of a saved model, or an embedded default's name, loaded for this job."""
    from pathlib import Path

    import cluster
    from actors.gateway.app import ServeConfig, load_models
    from actors.gateway.served import Replica, ServedModel
    from cluster.serving import ServingSpec

    name, sep, path = spec.partition("=")
    cluster.init(address=address)
    if address is not None:
        replicas = _resident_replicas(name)
        if replicas:
            folder = Path(replicas[0][1]["path"])
            print(f"[batch] using {len(replicas)} resident replica(s) of {name!r}", file=sys.stderr, flush=True)
            return ServedModel(name, folder, ServingSpec.read(folder), [Replica(i, c, adopted=True) for i, (c, _) in enumerate(replicas)],
                               ServeConfig().batching, resident=True)
    if sep:
        return load_models(ServeConfig(models={name: Path(path)}, address=address, resident=False))[name]
    from cluster.models.defaults import ensure_all_defaults

    folders = ensure_all_defaults()
    if name not in folders:
        raise SystemExit(f"unknown model {name!r}: give NAME=PATH of a saved model, or one of {sorted(folders)}")
    return load_models(ServeConfig(models={name: folders[name]}, address=address, resident=False))[name]


def _resident_replicas(name: str) -> list:
    """(coordinator, label) of every resident replica of model `name`, in replica order."""
    from actors.coordinator_actor import coordinator_name, find_coordinator

    found = []
    while (replica := find_coordinator(coordinator_name(name, len(found)))) is not None:
        found.append(replica)
    return found


def cmd_unload(args: argparse.Namespace) -> int:
    """Free the resident replicas of models (what `serve --resident` leaves loaded)."""
    import cluster

    cluster.init(address=args.address)
    for name in args.models:
        replicas = _resident_replicas(name)
        for coordinator, _ in replicas:
            coordinator.close()
        print(f"{name}: unloaded {len(replicas)} resident replica(s)")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Run a batch job here (attached to --address, or on a local cluster)."""
    import asyncio
    from pathlib import Path

    from clients.batch import run_batch

    model = _batch_model(args.model, args.address)
    output = Path(args.output)
    errors = Path(args.errors) if args.errors else output.with_suffix(output.suffix + ".errors")
    counts = asyncio.run(run_batch(model, Path(args.input), output, errors))
    print(json.dumps(counts))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a batch job through Ray's Jobs API (needs the cluster's dashboard: ray[default])."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        raise SystemExit(f"tpcluster submit needs Ray's Jobs API: pip install 'ray[default]' ({exc})")
    entry = (f"tpcluster batch --address auto --model {args.model} --input {os.path.abspath(args.input)} "
             f"--output {os.path.abspath(args.output)}")
    job = JobSubmissionClient(args.address).submit_job(entrypoint=entry)
    print(job)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    if args.action == "status":
        print(client.get_job_status(args.id))
    elif args.action == "logs":
        print(client.get_job_logs(args.id))
    else:
        print(client.stop_job(args.id))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpcluster", description="Tensor-parallel models resident on a Ray cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="trace the embedded MiniLM at TP=2 and embed the guide's sentences")
    demo.add_argument("--port", type=int, default=0, help="gateway port (0: any free port)")
    demo.add_argument("--neuron-cores", type=int, help="logical NeuronCores of the local cluster")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser("bench", help="measure against in-process baselines (ratios)")
    bench.add_argument("--only", nargs="*", choices=["core", "separation", "buckets", "trace_once", "decoder", "gateway", "generate", "batch", "soak"])
    bench.add_argument("--soak-clients", type=int, default=8)
    bench.add_argument("--soak-seconds", type=float, default=60.0)
    bench.add_argument("--repeats", type=int, default=30)
    bench.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    bench.add_argument("--chart", metavar="PATH", help="write a PNG chart of the ratios")
    bench.add_argument("--print-json", action="store_true", help="print the JSON instead of the one-line summary")
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="serve saved models (or the embedded defaults) over gRPC")
    serve.add_argument("--model", action="append", metavar="NAME=PATH", help="a saved model folder (repeatable)")
    serve.add_argument("--address", help="Ray cluster to attach to (auto, ray://host:10001); default: start a local one")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics over HTTP (0: off)")
    serve.add_argument("--replicas", type=int, default=1, help="replicas of every model")
    serve.add_argument("--neuron-cores", type=int, help="logical NeuronCores of a local cluster without Neuron devices")
    serve.add_argument("--max-batch", type=int, default=16, help="rows per dynamic batch")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    serve.add_argument("--max-queue", type=int, default=256, help="queued requests per model before RESOURCE_EXHAUSTED")
    serve.add_argument("--max-sequences", type=int, default=0,
                       help="Generate: sequences decoded together per replica (default: every KV-cache slot)")
    serve.add_argument("--no-batching", action="store_true", help="one request per forward, one sequence per replica")
    serve.add_argument("--auth-token-file", help="require 'authorization: Bearer <token>' with this token")
    serve.add_argument("--tls-cert", help="server certificate (PEM)")
    serve.add_argument("--tls-key", help="server private key (PEM)")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds to finish in-flight requests on shutdown")
    serve.add_argument("--ready-file", help="write the bound port here once serving")
    serve.add_argument("--resident", action=argparse.BooleanOptionalAction, default=None,
                       help="keep replicas loaded after exit and adopt resident ones at start "
                            "(default: on with --address, off on a local cluster)")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every request as JSON")
    serve.set_defaults(func=cmd_serve)

    def client_command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--target", default=os.environ.get("TPCLUSTER_TARGET", "127.0.0.1:50051"))
        p.add_argument("--token-file", help="bearer token file (or TPCLUSTER_TOKEN)")
        p.add_argument("--ca-file", help="CA certificate for TLS")
        p.add_argument("--timeout", type=float, default=60.0)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
        return p

    batch = sub.add_parser("batch", help="run a JSONL file through a model here, exactly once and resumable")
    batch.add_argument("--model", required=True, help="NAME=PATH of a saved model, or an embedded default's name")
    batch.add_argument("--input", required=True)
    batch.add_argument("--output", required=True)
    batch.add_argument("--errors", help="malformed or refused records (default: OUTPUT.errors)")
    batch.add_argument("--address", help="Ray cluster to attach to (default: a local cluster)")
    batch.set_defaults(func=cmd_batch)
    submit = sub.add_parser("submit", help="submit a batch job through Ray's Jobs API")
    submit.add_argument("--model", required=True)
    submit.add_argument("--input", required=True)
    submit.add_argument("--output", required=True)
    submit.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"), help="the Jobs API (http://head:8265)")
    submit.set_defaults(func=cmd_submit)
    unload = sub.add_parser("unload", help="free the resident replicas of models on a cluster")
    unload.add_argument("models", nargs="+", metavar="NAME")
    unload.add_argument("--address", default="auto", help="the Ray cluster (default: auto)")
    unload.set_defaults(func=cmd_unload)
    jobs = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    jobs.add_argument("action", choices=["status", "logs", "stop"])
    jobs.add_argument("id")
    jobs.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"))
    jobs.set_defaults(func=cmd_jobs)

    client_command("models", cmd_models, "list served models")
    client_command("status", cmd_status, "models, replicas and ranks with their node, NeuronCores and memory")
    client_command("health", cmd_health, "gRPC health of the gateway or one model").add_argument("service", nargs="?")
    p = client_command("embed", cmd_embed, "sentence embeddings")
    p.add_argument("texts", nargs="+")
    p.add_argument("--model", default="minilm-embed")
    p = client_command("classify", cmd_classify, "classify a text pair (two texts) or texts")
    p.add_argument("texts", nargs="+")
    p.add_argument("--model", default="minilm-paraphrase")
    p.add_argument("--single", action="store_true", help="classify each text alone, not as a pair")
    p = client_command("generate", cmd_generate, "generate text")
    p.add_argument("prompt")
    p.add_argument("--model", default="")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append")
    p.add_argument("--draft", help="draft model for speculative decoding")
    p.add_argument("--k", type=int, default=0, help="tokens the draft proposes per step")
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except Exception as exc:  # one line for the user; details with TPCLUSTER_DEBUG=1
        from clients.errors import TpClusterError
        from cluster.errors import ClusterError

        if isinstance(exc, (ClusterError, TpClusterError)) and not os.environ.get("TPCLUSTER_DEBUG"):
            print(f"tpcluster: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
