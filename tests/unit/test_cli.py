"""The `tpcluster` registry: every entry loads, and main turns our errors into one line."""

import argparse

import pytest

from actors import cli
from cluster.errors import InputError


class Raising:
    """A command whose run raises what the test puts in `error`."""

    error: BaseException = RuntimeError("unset")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--flag", action="store_true")

    @classmethod
    def run(cls, args: argparse.Namespace) -> int:
        raise cls.error


@pytest.fixture
def raising(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "raise", (f"{__name__}:Raising", "raise an error"))
    monkeypatch.delenv("TPCLUSTER_DEBUG", raising=False)
    return Raising


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_registered_command_loads_and_parses_its_help(name, capsys):
    command = cli.load_command(cli.COMMANDS[name][0])
    assert callable(command.add_arguments) and callable(command.run)
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0 and f"usage: tpcluster {name}" in capsys.readouterr().out


def test_our_error_is_one_line(raising, capsys):
    raising.error = InputError("prompt is empty; send some text")
    assert cli.main(["raise", "--flag"]) == 1
    assert capsys.readouterr().err == "tpcluster: error: prompt is empty; send some text\n"


def test_debug_shows_the_traceback_and_other_errors_propagate(raising, monkeypatch):
    raising.error = InputError("bad")
    monkeypatch.setenv("TPCLUSTER_DEBUG", "1")
    with pytest.raises(InputError):
        cli.main(["raise"])
    monkeypatch.delenv("TPCLUSTER_DEBUG")
    raising.error = KeyError("not ours")
    with pytest.raises(KeyError):
        cli.main(["raise"])


def test_interrupt_and_broken_pipe(raising):
    raising.error = KeyboardInterrupt()
    assert cli.main(["raise"]) == 130
    raising.error = BrokenPipeError()
    assert cli.main(["raise"]) == 0
