"""README.md and docs/ stay true: links resolve, command lines name real commands and options."""

import functools
import re
import shlex
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from mgrow.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI = typer.main.get_command(app)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SEPARATORS = set("();<>|&")  # shell punctuation: a token made only of these ends a command
OPTION = re.compile(r"--?[A-Za-z]")  # -o, --data=x; not -1 or a placeholder
OPTIONS = {name: {"--help", *(o for p in command.params for o in [*p.opts, *p.secondary_opts])}
           for name, command in [("mgrow", CLI), *(("mgrow " + n, c) for n, c in CLI.commands.items())]}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@functools.cache
def parse(page: Path) -> tuple[list, list]:
    """(prose lines, fenced blocks as (language, lines)); every line is (number, text)."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            if block is None:
                block = (line.strip()[3:].strip().lower(), [])
            else:
                blocks.append(block)
                block = None
        elif block is None:
            prose.append((number, line))
        else:
            block[1].append((number, line))
    return prose, blocks


@functools.cache
def slugs(page: Path) -> frozenset[str]:
    """GitHub's heading anchors: lowercase, punctuation but - and _ dropped, spaces -> -, -N for repeats."""
    found, count = set(), {}
    for _, line in parse(page)[0]:
        heading = re.match(r"#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if heading:
            text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))  # a link's text
            slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
            found.add(f"{slug}-{count[slug]}" if slug in count else slug)
            count[slug] = count.get(slug, 0) + 1
    return frozenset(found)


def links(page: Path):
    for number, line in parse(page)[0]:
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):  # inline code holds no links
            yield number, target


def command_lines(page: Path):
    """Each line of a bash block, backslash continuations joined, with its first line number."""
    for language, lines in parse(page)[1]:
        if language not in ("bash", "sh", "shell", "console"):
            continue
        joined, start = "", None
        for number, line in lines:
            start = start or number
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            yield start, joined + line
            joined, start = "", None


def mgrow_calls(line: str):
    """The arguments after `mgrow` (or .../mgrow, `python -m mgrow`) in each command of a line."""
    line = re.sub(r"<([^<>\s]+)>", r"\1", re.sub(r"^\s*\$\s+", "", line))  # a prompt, <placeholders>
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote in a placeholder: fall back to plain words
        tokens = line.split("#")[0].split()
    command: list[str] = []
    for token in [*tokens, ";"]:
        if token and set(token) <= SEPARATORS:
            starts = [i for i, t in enumerate(command) if t.rsplit("/", 1)[-1] == "mgrow"]
            if starts:
                yield command[starts[0] + 1 :]
            command = []
        else:
            command.append(token)


@functools.cache
def help_works(name: str) -> bool:
    return CliRunner().invoke(app, [name, "--help"]).exit_code == 0


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
    bad = []
    for number, target in links(page):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # http:, https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{rel(page)}:{number}: link {target!r}: {path} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest):
            bad.append(f"{rel(page)}:{number}: link {target!r}: no heading #{anchor} in {rel(dest)}")
    assert not bad, "broken links:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_command_lines_use_real_commands_and_options(page):
    bad = []
    for number, line in command_lines(page):
        for args in mgrow_calls(line):
            where = f"{rel(page)}:{number}: {line.strip()!r}"
            first = next((i for i, a in enumerate(args) if not OPTION.match(a)), len(args))
            used = [(a, "mgrow") for a in args[:first]]  # root options: --debug, --version, ...
            if first < len(args):
                name = args[first]
                if name not in CLI.commands or not help_works(name):
                    bad.append(f"{where}: unknown command {name!r}")
                    continue
                used += [(a, f"mgrow {name}") for a in args[first + 1 :]]
            for token, command in used:
                if OPTION.match(token) and token.split("=")[0] not in OPTIONS[command]:
                    bad.append(f"{where}: unknown option {token.split('=')[0]!r} for {command}")
    assert not bad, "command lines that do not match the CLI:\n" + "\n".join(bad)


def test_the_checks_above_find_what_they_check():
    calls = [a for p in PAGES for _, line in command_lines(p) for a in mgrow_calls(line)]
    assert len(calls) >= 10 and {"train", "train-sibling", "fuse", "finetune"} <= {c[0] for c in calls if c}
    assert sum(1 for p in PAGES for _ in links(p)) >= 20


def test_readme_is_a_front_door():
    readme = ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 300
    bash = ["\n".join(t for _, t in lines).strip() for lang, lines in parse(readme)[1] if lang == "bash"]
    assert bash[0].startswith("python3 -m venv .venv && .venv/bin/pip install -e . && ")
    assert bash[0].endswith(" bash examples/quickstart.sh") and (ROOT / "examples/quickstart.sh").exists()
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert bash[1] == ci[-1] and "pytest" in bash[1]
    assert "docs/architecture.md" in {target for _, target in links(readme)}
    index = {target for _, target in links(ROOT / "docs" / "README.md")}
    missing = [p.name for p in PAGES[1:] if p.name != "README.md" and p.name not in index]
    assert not missing, f"docs/README.md does not list {missing}"
