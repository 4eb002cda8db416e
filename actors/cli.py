"""The `tpcluster` command: a registry of subcommands, each loaded only when it runs.

`COMMANDS` maps a command name to where it lives and a one-line help. A target is either a module
("actors.commands.serve") or an object in one ("clients.commands:status"); either way it has
`add_arguments(parser)` and `run(args) -> int`. `tpcluster --help` lists the registry without
importing any command, and a client command imports neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("actors.commands.demo", "trace the embedded MiniLM at TP=2 and embed the guide's sentences"),
    "bench": ("actors.commands.bench", "measure against in-process baselines (ratios)"),
    "compile": ("actors.commands.compile", "compile a Hugging Face checkpoint folder into a saved model folder"),
    "serve": ("actors.commands.serve", "serve saved models or checkpoint folders (or the embedded defaults) over gRPC"),
    "batch": ("actors.commands.batch:batch", "run a JSONL file through a model here, exactly once and resumable"),
    "submit": ("actors.commands.batch:submit", "submit a batch job through Ray's Jobs API"),
    "unload": ("actors.commands.batch:unload", "free the resident replicas of models on a cluster"),
    "jobs": ("actors.commands.batch:jobs", "status, logs or stop of a submitted job"),
    "doctor": ("actors.commands.doctor", "which backend this machine uses and why; check collectives and a TP=2 trace"),
    "models": ("clients.commands:models", "list served models"),
    "status": ("clients.commands:status", "models, replicas and ranks with their node, NeuronCores and memory"),
    "health": ("clients.commands:health", "gRPC health of the gateway or one model"),
    "embed": ("clients.commands:embed", "sentence embeddings"),
    "classify": ("clients.commands:classify", "classify a text pair (two texts) or texts"),
    "generate": ("clients.commands:generate", "generate text"),
}

# Our two error trees, by (module, class) so that reporting an error imports neither of them.
_OUR_ERRORS = {("cluster.errors", "ClusterError"), ("clients.errors", "TpClusterError")}


def load_command(target: str) -> Any:
    """The command object at `target` ("package.module" or "package.module:name")."""
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def build_parser(name: str | None = None, command: Any = None) -> argparse.ArgumentParser:
    """The parser of every command name, with the arguments of `command` (the loaded `name`) only."""
    parser = argparse.ArgumentParser(prog="tpcluster", description="Tensor-parallel models resident on a Ray cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    for each, (_, summary) in COMMANDS.items():
        command_parser = sub.add_parser(each, help=summary)
        if each == name:
            command.add_arguments(command_parser)
    return parser


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _is_ours(exc: BaseException) -> bool:
    return any((cls.__module__, cls.__qualname__) in _OUR_ERRORS for cls in type(exc).__mro__)


def main(argv: list[str] | None = None) -> int:
    _offline()
    argv = sys.argv[1:] if argv is None else list(argv)
    name = next((arg for arg in argv if not arg.startswith("-")), None)  # argparse rejects any other name
    command = load_command(COMMANDS[name][0]) if name in COMMANDS else None
    args = build_parser(name, command).parse_args(argv)
    try:
        return command.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except Exception as exc:  # one line for the user; details with TPCLUSTER_DEBUG=1
        if _is_ours(exc) and not os.environ.get("TPCLUSTER_DEBUG"):
            print(f"tpcluster: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
