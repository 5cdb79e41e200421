"""The docs stay true: README.md and docs/*.md name only repository files that exist and link only to
pages and headings that exist; the README's command table is the parser's; every option of every command
has a help line that states its default; and every `retmask` command line in the docs and in `--help`
parses."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from retmask import cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a repository path: one of the project's top folders, a slash, then path characters (globs allowed)
PATH = re.compile(r"(?<![\w./~-])((?:retmask|kernels|benchmarks|scripts|tests|docs|examples|\.ci)/[\w./*-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _command_lines(text: str):
    """The argument lists of the `retmask` command lines in `text` (shell lines; `\\` continues a line;
    `# ...` is a comment; VAR=value prefixes and `torchrun/accelerate ... -m retmask.cli` are understood).
    Lines with `...` are sketches, not commands."""
    for line in text.replace("\\\n", " ").splitlines():
        if not re.match(r"\s*([A-Z_]+=\S*\s+)*(retmask|torchrun|accelerate) ", line):
            continue  # prose
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words.pop(0)
        if "-m" in words and "retmask.cli" in words:
            words = ["retmask", *words[words.index("retmask.cli") + 1:]]
        if words[:1] == ["retmask"] and "..." not in line:
            yield line.strip(), words[1:]


def _parses(parser, args) -> str | None:
    """None when `args` parse, else argparse's complaint."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(args)
    except SystemExit as e:
        return err.getvalue().strip().splitlines()[-1] if e.code else None
    return None


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_pages_name_only_files_that_exist(page):
    missing = []
    for m in PATH.finditer(page.read_text()):
        path = m.group(1).rstrip(".")
        if not (any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
            missing.append(path)
    assert not missing, f"{_rel(page)} names files that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_reach_a_page_and_heading(page):
    bad = []
    for m in LINK.finditer(page.read_text()):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not bad, f"{_rel(page)}: {bad}"


@pytest.mark.parametrize("page", PAGES[1:], ids=_rel)
def test_each_docs_page_opens_with_a_short_summary(page):
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# ") and not lines[1], f"{_rel(page)}: a title, then a blank line"
    summary = lines[2:lines.index("", 2)]
    assert 2 <= len(summary) <= 4, f"{_rel(page)}: the summary under the title has {len(summary)} lines (2-4)"


def test_readme_lists_every_command_of_the_cli():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `retmask ([\w-]+)` \|", section, re.M)
    assert sorted(listed) == sorted(_subcommands(cli.build_parser())), "README's command table vs `retmask --help`"
    assert len(listed) == len(set(listed))


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 210


def test_every_option_has_a_help_line_that_states_its_default():
    parser = cli.build_parser()
    fmt = parser._get_formatter()
    bad = []
    for name, sub in _subcommands(parser).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            text = fmt._expand_help(action) if action.help else ""
            if not text.strip():
                bad.append(f"{name} {flag}: no help")
            elif "default" not in text and "required" not in text:
                bad.append(f"{name} {flag}: the help does not state the default")
    assert not bad, bad


def test_help_examples_and_doc_commands_parse():
    """Each example in `retmask --help` and in each command's --help, and each `retmask` line of a code
    block in the docs, is a valid command line."""
    parser = cli.build_parser()
    subs = _subcommands(parser)
    sources = [("retmask --help", parser.epilog)] + [(f"retmask {n} --help", p.epilog) for n, p in subs.items()]
    for page in PAGES:
        sources += [(_rel(page), m.group(2)) for m in FENCE.finditer(page.read_text()) if m.group(1) in ("bash", "")]
    seen, bad = set(), []
    for where, text in sources:
        for line, args in _command_lines(text):
            seen.add(args[0] if args else "")
            if (err := _parses(parser, args)) is not None:
                bad.append(f"{where}: {line!r}: {err}")
    assert not bad, bad
    # the top-level help walks the workflow in order, one example per step
    steps = [words[0] for _, words in _command_lines(parser.epilog)]
    assert steps[:6] == ["detect", "heads", "pairs", "train", "niah", "helmet"]
    assert set(subs) <= seen  # every command has an example somewhere
