"""Every command the README, docs/ and deploy/ tell an operator to type exists with those options."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from sam.callback.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [
    ROOT / "README.md",
    ROOT / "SECURITY.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "deploy").rglob("*.*")),
]
# A command line of ours: `sam-callback ARGS`, `sam-callback.exe ARGS` or `-m sam.callback ARGS`.
OUR_COMMAND = re.compile(
    r"(?:sam-callback(?:\.exe)?|-m sam\.callback)[ \t]+((?:serve|check|init-db|send|spool|status)\b(?:\\\||[^`|\"'\n#}])*)"
)
UV_SYNC = re.compile(r"\buv sync(?: --[\w-]+(?: (?!-)[\w-]+)?)*")


_COMMAND_NAMES = {"serve", "check", "init-db", "send", "spool", "status", "test-mail"}


def _commands(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for path in DOCUMENTS:
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            text = match.group(1) if pattern.groups else match.group(0)
            found.append((path.relative_to(ROOT).as_posix(), text.strip().rstrip("`").strip()))
    return found


def _concrete(arguments: str) -> list[str]:
    """The words of a documented command line, with its placeholders filled in."""
    # Usage lines in tables: "[--status STATUS]" means the option may be given; "A\|B" is a choice.
    arguments = re.sub(r"\[([^\[\]]*)\]", r"\1", arguments.replace("\\|", "|"))
    arguments = re.sub(r" \| --[\w-]+ \S+", "", arguments)  # mutually exclusive options: the first
    arguments = re.sub(r"(\w+)(?:\|\w+)+", r"\1", arguments)  # a choice: its first value
    arguments = arguments.replace("…", "x").replace("<", "").replace(">", "")
    arguments = re.sub(r"(--[\w-]+-days) N\b", r"\1 1", arguments)
    arguments = re.sub(r"\bshow (?:SEQ|N)\b", "show 1", arguments)
    return shlex.split(arguments.replace("\\", "/"))


@pytest.mark.parametrize(("document", "command"), _commands(OUR_COMMAND))
def test_documented_sam_callback_commands_parse(document: str, command: str) -> None:
    if " " not in command:  # a command named in prose, not a line to type: it must exist
        assert command in _COMMAND_NAMES, f"{document}: no existe la orden '{command}'"
        return
    try:
        _parser().parse_args(_concrete(command))
    except SystemExit as exc:
        pytest.fail(f"{document}: 'sam-callback {command}' no es una orden válida (salida {exc.code})")


def test_the_documents_name_commands_at_all() -> None:
    commands = {command.split()[0] for _, command in _commands(OUR_COMMAND)}
    assert {"serve", "check", "init-db", "send", "spool", "status"} <= commands


@pytest.mark.parametrize(("document", "command"), sorted(set(_commands(UV_SYNC))))
def test_documented_uv_sync_commands_are_accepted_by_uv(document: str, command: str, tmp_path: Path) -> None:
    """`uv sync --extra mssql` failed: there is no such extra (pyodbc is a base dependency)."""
    words = shlex.split(command)
    result = subprocess.run(
        [*words, "--dry-run", "--offline"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={"UV_PROJECT_ENVIRONMENT": str(tmp_path / "venv"), "PATH": __import__("os").environ["PATH"],
             "HOME": str(tmp_path), "UV_CACHE_DIR": __import__("os").environ.get("UV_CACHE_DIR", str(Path.home() / ".cache" / "uv"))},
    )  # fmt: skip
    assert result.returncode == 0, f"{document}: '{command}': {result.stderr}"
