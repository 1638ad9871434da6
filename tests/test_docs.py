"""The site admin's documentation (docs/admin/) names only commands the CLI accepts.

An admin copies these lines into a root shell or a configuration-management recipe; a flag
renamed in the code but not in the docs fails there, on a production node. So every
``jobtoken ...`` command line in docs/admin is parsed here with the real parser, the way
``cli.main`` parses it (``--`` starts the payload, ``devserver`` has its own parser).

* In fenced code blocks a command line must parse completely.
* In inline code (`` `jobtoken ensure --min-valid 60` ``) prose may leave out required
  arguments, but every subcommand and flag it does name must exist.

Commands another engineer is adding are skipped by their first word through ``UPCOMING``,
and only through it; the lead empties it once they are merged.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from jobtoken._errors import ConfigError, UsageError
from jobtoken.cli import build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs" / "admin"

# Subcommands documented ahead of their merge (the lead empties this after merging them):
# check-config (issue 14 item 3), broker (issue 13, BROKER.md).
UPCOMING: frozenset = frozenset()

# `jobtoken` as a command word: at the start, after whitespace or a shell operator, or as
# /usr/bin/jobtoken; not inside a path or a longer name (jobtoken-wrap, jobtoken.toml).
_COMMAND = re.compile(r"(?:^|(?<=[\s;|&(`]))(?:/usr/bin/)?jobtoken(?=\s)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE = re.compile(r"`([^`\n]+)`")
_SHELL_STOP = {";", "|", "||", "&", "&&", ">", ">>", "<", "(", ")"}


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    text: str
    words: List[str]
    complete: bool  # from a code block: nothing may be left out


def _words(rest: str) -> List[str]:
    """The command's arguments, up to a shell operator or comment (quotes resolved)."""
    lexer = shlex.shlex(rest, posix=True, punctuation_chars=";|&<>()")
    lexer.whitespace_split = True
    lexer.commenters = ""  # as the shell: only a word that starts with # starts a comment
    words = []
    for word in lexer:
        if word.startswith("#") or word in _SHELL_STOP or set(word) <= set(";|&<>()"):
            break
        words.append(word)
    return words


def _commands_in(line: str, where: str, complete: bool) -> Iterator[Command]:
    for match in _COMMAND.finditer(line):
        rest = line[match.end():]
        yield Command(where, line.strip(), _words(rest), complete)


def doc_commands(path: Path) -> Iterator[Command]:
    """Every jobtoken command line of one Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    in_block = False
    pending = ""
    for number, line in enumerate(lines, 1):
        where = f"{path.name}:{number}"
        if _FENCE.match(line):
            in_block = not in_block
            pending = ""
            continue
        if in_block:
            if line.rstrip().endswith("\\"):  # continued on the next line
                pending += line.rstrip()[:-1] + " "
                continue
            yield from _commands_in(pending + line, where, complete=True)
            pending = ""
            continue
        for span in _INLINE.findall(line):
            if _COMMAND.match(span.strip()):
                yield from _commands_in(span.strip(), where, complete=False)


def _lenient(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` with nothing required (for prose that names a command or a flag without
    all its arguments); every subcommand and flag still has to exist."""
    for group in parser._mutually_exclusive_groups:  # noqa: SLF001
        group.required = False
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in set(action.choices.values()):
                _lenient(sub)
        else:
            action.required = False
            if action.nargs is None:  # a positional, or a flag named without its value
                action.nargs = "?"
    return parser


def parse_error(command: Command) -> Optional[str]:
    """Why the CLI would refuse this command line; None when it parses."""
    words = list(command.words)
    if words[:1] == ["devserver"]:
        from jobtoken.devserver._cli import build_parser as devserver_parser

        parser, words = devserver_parser(), words[1:]
    else:
        parser = build_parser()
    if not command.complete:
        parser = _lenient(parser)
    if "--" in words:  # as cli.main: what follows is the payload
        words = words[: words.index("--")]
    if words in ([], ["--version"]):
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # a documented --help prints
            parser.parse_args(words)
    except UsageError as exc:
        return exc.message
    except SystemExit as exc:  # argparse's own error path (the devserver parser)
        return None if exc.code == 0 else f"argparse exit {exc.code}"
    return None


def _all_commands() -> List[Command]:
    return [c for path in sorted(DOCS.glob("*.md")) for c in doc_commands(path)]


def _checked(commands: List[Command]) -> List[Command]:
    return [c for c in commands if not (c.words and c.words[0] in UPCOMING)]


def test_every_jobtoken_command_in_the_admin_docs_parses():
    commands = _checked(_all_commands())
    # the docs must really show commands, or this test would pass on nothing
    assert len(commands) >= 20, [c.text for c in commands]
    failures = [f"{c.where}: {c.text}\n    -> {parse_error(c)}" for c in commands
                if parse_error(c) is not None]
    assert not failures, "\n".join(failures)


def test_upcoming_commands_are_documented_and_not_yet_in_the_cli():
    """Each name in UPCOMING is used by the docs and unknown to the parser; once the CLI
    has it, this fails, so the lead removes it and the docs are checked again."""
    documented = {c.words[0] for c in _all_commands() if c.words}
    known = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    assert UPCOMING <= documented
    assert not (UPCOMING & known), f"now in the CLI, remove from UPCOMING: {UPCOMING & known}"


@pytest.mark.parametrize(
    ("line", "complete", "refused"),
    [
        ("jobtoken ensure --dir /tmp/jt --min-valid 60", True, False),
        ("jobtoken ensure --dir /tmp/jt", True, True),  # --min-valid is required
        ("jobtoken ensure --dir /tmp/jt", False, False),  # prose may leave it out
        ("jobtoken ensure --min-vaild 60", False, True),  # a misspelt flag never passes
        ("jobtoken chek-config", False, True),
        ("sudo jobtoken run --dir d -- sh -c 'a; b' # comment", True, False),
        ("x=1; /usr/bin/jobtoken status \"$d/jt\" | head -3", True, False),
        ("jobtoken status --bogus 2>/dev/null", True, True),
        ("statecallout = FINISHED /usr/bin/jobtoken arc end --job-id %I", True, False),
        ("jobtoken devserver serve --tls-dir /tmp/tls", True, False),
        ("jobtoken revoke --mom-id a#b /d  # --bogus is a comment", True, False),
    ],
)
def test_the_checker_tells_real_from_broken_command_lines(line, complete, refused):
    (command,) = list(_commands_in(line, "example", complete))
    assert (parse_error(command) is not None) is refused


def test_continued_lines_in_code_blocks_are_one_command(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("```sh\njobtoken prepare --dir /d \\\n    --job-id 7 --bogus\n```\n")
    (command,) = list(doc_commands(doc))
    assert command.words[-1] == "--bogus" and parse_error(command) is not None


def test_names_that_only_contain_jobtoken_are_not_commands():
    line = "`jobtoken-wrap -- cmd`, `/etc/jobtoken/jobtoken.toml`, `jobtoken_*.deb`"
    assert list(_commands_in(line, "example", False)) == []


def test_every_relative_link_in_the_admin_docs_leads_to_a_file():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = [
        f"{path.name}: {target}"
        for path in sorted(DOCS.glob("*.md"))
        for target in link.findall(path.read_text(encoding="utf-8"))
        if "://" not in target and not (path.parent / target).exists()
    ]
    readme = DOCS.parent.parent / "README.md"
    assert "docs/admin/README.md" in readme.read_text(encoding="utf-8")
    assert not broken, broken


def _setting_tables(text: str) -> dict:
    """``{section: {key, ...}}`` from configure.md's ``### [section]`` tables (first cells)."""
    tables: dict = {}
    section = None
    for line in text.splitlines():
        heading = re.match(r"### \[(\w+)\]", line)
        if heading:
            section = heading.group(1)
            tables[section] = set()
        elif line.startswith("#"):
            section = None
        elif section and line.startswith("| `"):
            first_cell = line.split("|")[1]
            tables[section].update(re.findall(r"`(\w+)`", first_cell))
    return tables


def test_configure_md_documents_every_setting_and_no_other():
    from dataclasses import fields

    from jobtoken._config import _ENV, _SECTIONS

    text = (DOCS / "configure.md").read_text(encoding="utf-8")
    documented = _setting_tables(text)
    for section, cls in _SECTIONS.items():
        if section in UPCOMING:
            continue
        assert documented.get(section) == {f.name for f in fields(cls)}, section
    assert set(documented) <= set(_SECTIONS) | UPCOMING
    missing = [var for var in ("JOBTOKEN_CONFIG", *_ENV) if f"`{var}`" not in text]
    assert not missing, missing


def test_every_toml_example_in_the_admin_docs_is_a_valid_config(tmp_path):
    from jobtoken._config import load_config

    block = re.compile(r"^```toml\n(.*?)^```", re.S | re.M)
    examples = [(path.name, body) for path in sorted(DOCS.glob("*.md"))
                for body in block.findall(path.read_text(encoding="utf-8"))]
    checked = 0
    for name, body in examples:
        if set(re.findall(r"^\[(\w+)\]", body, re.M)) & UPCOMING:
            continue
        config_file = tmp_path / "jobtoken.toml"
        config_file.write_text(body, encoding="utf-8")
        try:
            load_config(str(config_file), env={})
        except ConfigError as exc:  # an unknown key, a bad value
            pytest.fail(f"{name}: {exc.message}")
        checked += 1
    assert checked >= 2
