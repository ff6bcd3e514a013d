"""The README cannot drift from the commands: its commands table has one row per command the
``raftseq`` parser defines (and no other), every option a row names exists on that command, and
every ``raftseq ...`` command line the README shows parses (``chaos`` and ``bench`` lines with
the parsers of their suites)."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from raftseq.cluster.cli import build_parser
from raftseq.cluster.cli.suites import SOURCE_SUITES

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RAFTSEQ = os.path.join(os.path.dirname(sys.executable), "raftseq")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0].choices) if found else {}


def leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """``"journal verify"`` → its parser, for every command that runs (not a group; a command
    with subcommands of its own, ``node`` and ``node drain``, is both)."""
    leaves = {}
    for name, sub in subcommands(parser).items():
        path = f"{prefix} {name}".strip()
        leaves.update(leaf_commands(sub, path) if subcommands(sub) else {path: sub})
        if subcommands(sub) and sub.get_default("func") is not None:
            leaves[path] = sub
    return leaves


def suite_parser(command: str) -> argparse.ArgumentParser:
    if command == "chaos":
        from chaos_tests.__main__ import _parser

        return _parser()
    from benchmarks.__main__ import build_parser as bench_parser

    return bench_parser()


def table_rows() -> list[tuple[list[str], str]]:
    """Each row of the README's commands table: the ``raftseq ...`` invocations of its first
    column (a row may name several, ``/``-separated) and the column's text."""
    text = README.read_text()
    table = text[text.index("| command | what it does |") :].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        first = line.split(" | ", 1)[0].lstrip("| ")
        rows.append((re.findall(r"`((?:raftseq )?[a-z][^`]*)`", first), first))
    return rows


def row_command(invocation: str, known: set[str]) -> str:
    words = invocation.removeprefix("raftseq ").split()
    for length in (2, 1):
        candidate = " ".join(words[:length])
        if candidate in known:
            return candidate
    raise AssertionError(f"{invocation!r} names no raftseq command")


def test_the_table_has_one_row_per_command_and_only_their_options():
    leaves = leaf_commands(build_parser())
    known = set(leaves) | set(SOURCE_SUITES)
    covered = set()
    for invocations, cell in table_rows():
        assert invocations, f"a row names no command: {cell}"
        for invocation in invocations:
            command = row_command(invocation, known)
            covered.add(command)
            parser = leaves[command]
            if command in SOURCE_SUITES:  # chaos and bench: the suite's own parser (and its subcommands)
                parser = suite_parser(command)
                sub = invocation.removeprefix("raftseq ").split()[1:2]
                parser = subcommands(parser).get(sub[0], parser) if sub else parser
            options = {s for a in parser._actions for s in a.option_strings}
            named = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", invocation))
            assert named <= options, f"README row {invocation!r}: {sorted(named - options)} not options of raftseq {command}"
    assert covered == known, f"commands without a README row: {sorted(known - covered)}; rows for no command: {sorted(covered - known)}"


def readme_command_lines() -> list[str]:
    """Every ``raftseq ...`` command line in the README's code blocks."""
    return [m.strip() for m in re.findall(r"^    (raftseq [^#\n]*)", README.read_text(), flags=re.M)]


def test_every_command_the_prose_names_exists():
    known = set(leaf_commands(build_parser())) | set(SOURCE_SUITES)
    for mention in re.findall(r"`(raftseq [a-z][^`]*)`", README.read_text()):
        row_command(mention, known)


@pytest.mark.parametrize("line", readme_command_lines())
def test_every_command_line_in_the_readme_parses(line):
    argv = shlex.split(line)[1:]
    if argv[0] in SOURCE_SUITES:
        parser, argv = suite_parser(argv[0]), argv[1:]
    else:
        parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"README command {line!r} does not parse (exit {exc.code})") from None


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_help_texts_speak_of_the_product_not_of_its_work_items():
    texts = [p.format_help() for p in _parsers(build_parser())]
    for suite in (["bench", "--help"], ["chaos", "--help"], ["chaos", "run", "--help"]):
        done = subprocess.run([RAFTSEQ, *suite], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert done.returncode == 0 and "usage" in done.stdout, done
        texts.append(done.stdout)
    assert len(texts) > 20  # every command and group, and the suites
    for text in texts:
        assert not re.search(r"\bissues?\b", text, re.IGNORECASE), text
