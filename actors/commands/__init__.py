"""The server-side commands of `tpcluster`, loaded by name from actors.cli's registry.

A module here is one command (`add_arguments(parser)`, `run(args) -> int`), or holds several
as `Command` objects. Each imports cluster, torch and Ray inside `run` only.
"""

from __future__ import annotations

import argparse
from typing import Callable, NamedTuple


class Command(NamedTuple):
    """One subcommand, as actors.cli expects it: add its arguments, then run with them."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
