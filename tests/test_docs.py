"""README.md and docs/*.md: every relative link resolves, the README fits in ten minutes, and every shell command
either names a gateway route, parses with the CLI it calls, or is a listed outside tool."""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.__main__ import _parser as bench_parser
from gateway.app import create_app
from gateway.cli import _parser as cli_parser
from gateway.config import load_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
SHELL = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Programs the docs may show that no offline test can run; anything else must be checkable here.
OUTSIDE_TOOLS = {
    "apt-get", "brew", "docker", "kubectl", "redis-server", "redis-cli", "echo", "export", "cd", "git", "kill",
    "py-spy", "valgrind", "wrk", "sleep", "printf",
}


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def prose(text: str) -> str:
    """The text without fenced blocks: a `#` comment in a shell block is not a heading, a link in YAML no link."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=ids(DOCS))
def test_every_relative_link_resolves_to_a_file_and_its_anchor(doc: Path) -> None:
    links = LINK.findall(prose(doc.read_text()))
    for target in links:
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor:
            assert file.suffix == ".md", f"{doc.name}: anchor into a non-Markdown file: {target}"
            assert anchor in anchors(file), f"{doc.name}: {target}: no heading with that anchor in {file.name}"


def test_the_readme_fits_in_ten_minutes_and_leaves_the_benchmark_to_docs() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "<!-- bench:start -->" not in text  # `python -m bench --readme` writes docs/performance.md
    assert "<!-- bench:start -->" in (ROOT / "docs/performance.md").read_text()
    assert "](docs/performance.md)" in text


def commands(block: str) -> Iterator[list[str]]:
    """Each simple command of a shell block (pipelines, lists and `$(...)` split), without `VAR=value` prefixes."""
    text = block.replace("\\\n", " ")
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars="();<>|&")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set("();<>|&"):
                yield from _without_assignments(words)
                words = []
            else:
                words.append(token)


def _without_assignments(words: list[str]) -> Iterator[list[str]]:
    while words and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    if words and words[0] != "$":
        yield words


def shell_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for block in SHELL.findall(doc.read_text()):
            found += [(doc.name, argv) for argv in commands(block)]
    return found


ROUTES = [
    re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(r.canonical)) + "$")
    for r in create_app(load_config(ROOT / "config/demo.yaml")).router.resources()
    if "unmatched" not in r.canonical
]


def check(argv: list[str]) -> None:
    """Fails unless the command can work as written: parsed by its parser, or a route the gateway serves."""
    program = Path(argv[0]).name
    if program == "embedding-gateway":
        parse(cli_parser(), argv[1:])
    elif program in ("python", "python3"):
        check_python(argv[1:])
    elif program in ("pip", "pip3"):
        check_pip(argv[1:])
    elif program == "curl":
        url = next(a for a in argv if a.startswith("http"))
        assert url.startswith("http://127.0.0.1:8080/"), url
        path = url.removeprefix("http://127.0.0.1:8080").split("?")[0]
        assert any(route.match(path) for route in ROUTES), f"the gateway serves no {path}"
    else:
        assert program in OUTSIDE_TOOLS, f"{program}: not checkable here (add a check or list it as an outside tool)"


def check_python(args: list[str]) -> None:
    if args[:2] == ["-m", "bench"]:
        parse(bench_parser(), args[2:])
    elif args[0] == "-m":
        assert args[1] in ("venv", "pytest"), args
    else:
        assert (ROOT / args[0]).is_file(), f"no script {args[0]}"


def check_pip(args: list[str]) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    target = args[-1]
    assert args[0] == "install" and (target == "." or target.startswith(".[")), args
    for extra in re.findall(r"\w+", target.removeprefix(".[")):
        assert extra in extras, f"pyproject.toml has no extra {extra!r}"


def parse(parser: argparse.ArgumentParser, args: list[str]) -> None:
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{parser.prog} {shlex.join(args)}: refused by its parser") from exc


@pytest.mark.parametrize(("doc", "argv"), shell_commands(), ids=lambda v: v if isinstance(v, str) else shlex.join(v))
def test_every_shell_command_in_the_docs_is_one_that_works(doc: str, argv: list[str]) -> None:
    check(argv)


def test_the_command_check_can_fail() -> None:
    for bad in ("embedding-gateway serve --no-such-flag", "curl -s http://127.0.0.1:8080/v1/nothing",
                "python -m bench --only", "pip install -e '.[nosuchextra]'", "rm -rf /"):
        argv = next(commands(bad))
        with pytest.raises(AssertionError):
            check(argv)
