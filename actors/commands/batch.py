"""Batch jobs from the command line: `tpcluster batch`, `unload`, `submit` and `jobs`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from actors.commands import Command


def _batch_model(spec: str, address: str | None):
    """A ServedModel for a batch job: the resident replicas of NAME (a gateway's, on a cluster) that
    hold the model as it is now, else NAME=PATH of a saved model, or an embedded default's name,
    loaded for this job."""
    from pathlib import Path

    import cluster
    from actors.gateway.app import ServeConfig, adopt_model, load_models

    name, sep, path = spec.partition("=")
    cluster.init(address=address)
    if address is not None:
        model = adopt_model(name, Path(path) if sep else None)
        if model is not None:
            print(f"[batch] using {len(model.pool.replicas)} resident replica(s) of {name!r}", file=sys.stderr, flush=True)
            return model
    if sep:
        return load_models(ServeConfig(models={name: Path(path)}, address=address, resident=False))[name]
    from cluster.models.defaults import ensure_all_defaults

    folders = ensure_all_defaults()
    if name not in folders:
        raise SystemExit(f"unknown model {name!r}: give NAME=PATH of a saved model, or one of {sorted(folders)}")
    return load_models(ServeConfig(models={name: folders[name]}, address=address, resident=False))[name]


def _add_batch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="NAME=PATH of a saved model, or an embedded default's name")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--errors", help="malformed or refused records (default: OUTPUT.errors)")
    parser.add_argument("--address", help="Ray cluster to attach to (default: a local cluster)")


def _run_batch(args: argparse.Namespace) -> int:
    """Run a batch job here (attached to --address, or on a local cluster)."""
    import asyncio
    from pathlib import Path

    from actors.batch import run_batch

    model = _batch_model(args.model, args.address)
    output = Path(args.output)
    errors = Path(args.errors) if args.errors else output.with_suffix(output.suffix + ".errors")
    counts = asyncio.run(run_batch(model, Path(args.input), output, errors))
    print(json.dumps(counts))
    return 0


def _add_unload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="NAME")
    parser.add_argument("--address", default="auto", help="the Ray cluster (default: auto)")


def _run_unload(args: argparse.Namespace) -> int:
    """Free the resident replicas of models (what `serve --resident` leaves loaded)."""
    import cluster

    from actors.replicas import resident_replicas

    cluster.init(address=args.address)
    for name in args.models:
        replicas = resident_replicas(name)
        for coordinator, _ in replicas:
            coordinator.close()
        print(f"{name}: unloaded {len(replicas)} resident replica(s)")
    return 0


def _add_submit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"), help="the Jobs API (http://head:8265)")


def _run_submit(args: argparse.Namespace) -> int:
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


def _add_jobs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["status", "logs", "stop"])
    parser.add_argument("id")
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"))


def _run_jobs(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    if args.action == "status":
        print(client.get_job_status(args.id))
    elif args.action == "logs":
        print(client.get_job_logs(args.id))
    else:
        print(client.stop_job(args.id))
    return 0


batch = Command(_add_batch, _run_batch)
unload = Command(_add_unload, _run_unload)
submit = Command(_add_submit, _run_submit)
jobs = Command(_add_jobs, _run_jobs)
