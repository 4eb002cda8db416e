"""`tpcluster demo`: a local cluster, the embedded models at TP=2 behind a real gateway, real client calls."""

from __future__ import annotations

import argparse
import json
import sys

PROMPT = "The for statement is used to"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=0, help="gateway port (0: any free port)")
    parser.add_argument("--neuron-cores", type=int, help="logical NeuronCores of the local cluster")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """The main job: a local cluster, the embedded models at TP=2 behind a real gateway, real client calls."""
    import numpy as np

    import cluster
    from actors.bench import SENTENCES
    from actors.gateway.app import BackgroundGateway, ServeConfig
    from actors.gateway.server import GatewayConfig
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
                runs = (("target only", "", 0), ("speculative, draft pair-draft fused into the target, k=4", "pair-draft", 4),
                        ("speculative, fused draft, adaptive k", "pair-draft", 0))
                for label, draft, k in runs:
                    # Each configuration runs once untimed first: the ranks load a bucket's graph on its first
                    # use, and that one-off cost would make whichever runs first look slow.
                    for _ in range(2):
                        generations[label] = client.generate(PROMPT, model="pair-target", max_new_tokens=40,
                                                             draft_model=draft, speculation_length=k)
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
        print(f"Generate (shipped pair, {label}; {g['tokens']} tokens, {g['tokens_per_second']:.0f} tok/s after a warm-up run{extra}):")
        print(f"  {PROMPT}{g['text']}")
    return 0
