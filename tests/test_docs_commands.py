"""Every `geojepa ...` command shown in README.md and docs/ exists, with the options it is shown with: a
renamed command or option fails here, naming the file and line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer

from geojepa.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
STOP = {"|", "||", "&&", ";", "&", "#", ">", "2>&1"}


def shown(text: str) -> list[tuple[int, str]]:
    """(line, command text after `geojepa `) of every command in code: fenced blocks and inline code."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        segments = [line] if fenced else re.findall(r"`([^`]+)`", line)
        for seg in segments:
            for m in re.finditer(r"(?:^|[\s(])geojepa ([a-z][a-z-]*(?: .*)?)$", seg):
                out.append((n, m.group(1)))
    return out


def _group(cmd) -> bool:
    return hasattr(cmd, "commands")  # typer ships its own click: a group is a command with subcommands


def problems(cmd, words: list[str]) -> str | None:
    """Why ``words`` (the tokens after `geojepa`) is not a valid invocation's command and options; None if it is."""
    path = []
    while _group(cmd) and words and not words[0].startswith("-"):
        sub = cmd.commands.get(words[0])
        if sub is None:
            return f"no command `geojepa {' '.join([*path, words[0]])}`"
        path.append(words.pop(0))
        cmd = sub
    if _group(cmd):
        if not words or words[0] in ("--help", "--version"):
            return None
        return f"`geojepa {' '.join(path)}` needs a command"
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    for w in words:
        if w in STOP or w.startswith("#"):
            break
        if w.startswith("--") or re.fullmatch(r"-[a-zA-Z]", w):
            name = w.split("=", 1)[0]
            if name not in known:
                return f"`geojepa {' '.join(path)}` has no option {name}"
    return None


def test_every_command_in_the_docs_exists_with_its_options():
    root = typer.main.get_command(app)
    bad, seen = [], 0
    for page in PAGES:
        for n, text in shown(page.read_text()):
            try:
                words = shlex.split(text, comments=True)
            except ValueError:
                words = text.split()
            words = [w for w in words if "..." not in w]
            if (why := problems(root, words)) is not None:
                bad.append(f"{page.relative_to(ROOT)}:{n}: {why}")
            seen += 1
    assert seen > 20  # the pages show commands: the scan found them
    assert not bad, "\n".join(bad)


def test_a_renamed_command_or_option_is_caught():
    root = typer.main.get_command(app)
    assert problems(root, ["embed", "a", "b", "--model", "m"]) is None
    assert problems(root, ["tokenizer", "fit", "T", "--data", "W"]) is None
    assert "no command" in problems(root, ["embedd", "a"])
    assert "no option --modle" in problems(root, ["embed", "a", "b", "--modle", "m"])
    assert [c for _, c in shown("text `geojepa map out/k` and geojepa/cli.py\n```\ngeojepa info W --json\n```")] == [
        "map out/k", "info W --json"]
