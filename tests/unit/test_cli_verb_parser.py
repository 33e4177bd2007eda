"""The CLI builds only the parser of the verb on its command line (start-up time): the
result of parsing, the verb's help and the errors are those of the whole parser."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from vmconfine.cli import build_parser, verb_of

LINES = [
    (["run", "d.xml"], "run"),
    (["-c", "qemu:///embed?root=/x", "run", "--paused", "d.xml"], "run"),
    (["--connect=qemu:///session", "-r", "list", "--all"], "list"),
    (["-cqemu:///system", "--debug", "destroy", "vm1"], "destroy"),
    (["qemu-monitor-command", "vm", "--hmp", "info", "status"], "qemu-monitor-command"),
    (["shutdown", "vm", "--timeout", "5"], "shutdown"),
    (["confinement", "--json", "-"], "confinement"),
]


@pytest.mark.parametrize("argv,verb", LINES)
def test_same_parse_as_the_whole_parser(argv: list[str], verb: str) -> None:
    assert verb_of(argv) == verb
    assert vars(build_parser(verb).parse_args(argv)) == vars(build_parser().parse_args(argv))


def _outcome(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[object, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.raises(SystemExit) as exc:
        parser.parse_args(argv)
    return exc.value.code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", [["run", "--help"], ["run"], ["list", "--bogus"],
                                  ["-c", "x", "dominfo"]])
def test_help_and_errors_are_the_same(argv: list[str]) -> None:
    assert _outcome(build_parser(verb_of(argv)), argv) == _outcome(build_parser(), argv)


@pytest.mark.parametrize("argv", [[], ["--help"], ["--version"], ["-x", "run"], ["-c"]])
def test_no_verb_means_the_whole_parser(argv: list[str]) -> None:
    assert verb_of(argv) is None


def test_unknown_verb_is_left_to_the_whole_parser() -> None:
    with pytest.raises(LookupError):
        build_parser("nosuch")
