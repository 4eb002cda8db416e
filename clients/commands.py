"""The client commands of `tpcluster` (models, status, health, embed, classify, generate).

Each is a `Command` that actors.cli loads by name ("clients.commands:status") and uses only when
that command runs. They talk to a gateway through clients.client; nothing here imports torch,
Ray or the server packages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Any, Callable, NamedTuple

from clients.client import Client


class Command(NamedTuple):
    """One subcommand, as actors.cli expects it: add its arguments, then run with them."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("TPCLUSTER_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--token-file", help="bearer token file (or TPCLUSTER_TOKEN)")
    parser.add_argument("--ca-file", help="CA certificate for TLS")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="each call's deadline in seconds; UNAVAILABLE (a replica rebuilding) is retried until then")
    parser.add_argument("--json", action="store_true")


def _client(args: argparse.Namespace) -> Client:
    token = open(args.token_file).read().strip() if args.token_file else os.environ.get("TPCLUSTER_TOKEN")
    certs = open(args.ca_file, "rb").read() if args.ca_file else None
    return Client(args.target, token=token, root_certificates=certs, timeout=args.timeout, on_wait=_say_waiting)


def _say_waiting(line: str) -> None:
    print(f"tpcluster: {line}", file=sys.stderr, flush=True)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1) if args.json else text)


def _run_models(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        models = client.list_models()
    rows = [MessageToDict(m, preserving_proto_field_name=True) for m in models]
    _print(args, rows, "\n".join(f"{m.name:24} {m.task:9} tp={m.tp_degree} replicas={m.ready_replicas}/{m.replicas} "
                                   f"{'ready' if m.ready else 'NOT READY'}" for m in models))
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        status = client.status()
    lines = [f"gateway {status.gateway_version}"]
    for m in status.models:
        reuse = (f", prefix reuse {m.prefix_hits}/{m.generations} generations ({m.prefix_reused_tokens} tokens)"
                 if m.generations else "")
        lines.append(f"{m.name} ({m.task}, tp={m.tp_degree}, queue {m.queue_depth}{reuse})")
        for r in m.replicas:
            lines.append(f"  replica {r.index}: {'ready' if r.ready else 'NOT READY ' + r.error}")
            for rank in r.ranks:
                lines.append(f"    rank {rank.rank}: node {rank.node} neuron_cores {rank.neuron_cores or '-'} pid {rank.pid} "
                             f"rss {rank.memory_bytes / 2**20:.0f} MiB")
    _print(args, MessageToDict(status, preserving_proto_field_name=True), "\n".join(lines))
    return 0


def _add_health(parser: argparse.ArgumentParser) -> None:
    _connection_arguments(parser)
    parser.add_argument("service", nargs="?")


def _run_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        state = client.health(args.service or "")
    _print(args, {"service": args.service or "", "status": state}, state)
    return 0 if state == "SERVING" else 2


def _add_embed(parser: argparse.ArgumentParser) -> None:
    _connection_arguments(parser)
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--model", default="minilm-embed")


def _run_embed(args: argparse.Namespace) -> int:
    with _client(args) as client:
        vectors = client.embed(args.texts, model=args.model)
    _print(args, {"embeddings": vectors.tolist()},
           "\n".join(f"[{i}] {len(v)}-d  {' '.join(f'{x:+.3f}' for x in v[:6])} ..." for i, v in enumerate(vectors)))
    return 0


def _add_classify(parser: argparse.ArgumentParser) -> None:
    _connection_arguments(parser)
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--model", default="minilm-paraphrase")
    parser.add_argument("--single", action="store_true", help="classify each text alone, not as a pair")


def _run_classify(args: argparse.Namespace) -> int:
    inputs = [tuple(args.texts[:2])] if len(args.texts) == 2 and not args.single else list(args.texts)
    with _client(args) as client:
        results = client.classify(inputs, model=args.model)
    _print(args, [{"label": r.label, "label_id": r.label_id, "logits": list(r.logits)} for r in results],
           "\n".join(f"{r.label} (logits {', '.join(f'{x:.3f}' for x in r.logits)})" for r in results))
    return 0


def _add_generate(parser: argparse.ArgumentParser) -> None:
    _connection_arguments(parser)
    parser.add_argument("prompt")
    parser.add_argument("--model", default="")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: the server's default (64)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.0, help="0: no top-p filtering")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append")
    parser.add_argument("--draft", help="draft model for speculative decoding")
    parser.add_argument("--k", type=int, default=0, help="tokens the draft proposes per step (0: the server's default, adaptive: each step picks k from measured acceptance and cost)")


def _run_generate(args: argparse.Namespace) -> int:
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
    _print(args, {"text": result.text, "token_ids": result.token_ids, "stats": asdict(result.stats) if result.stats else None},
           args.prompt + result.text)
    return 0


models = Command(_connection_arguments, _run_models)
status = Command(_connection_arguments, _run_status)
health = Command(_add_health, _run_health)
embed = Command(_add_embed, _run_embed)
classify = Command(_add_classify, _run_classify)
generate = Command(_add_generate, _run_generate)
