"""Windows readiness: Windows-style paths in settings, pathlib on disk paths, no POSIX-only calls."""

from __future__ import annotations

import ast
import typing
from collections.abc import Callable
from pathlib import Path, PureWindowsPath

import pytest
from fastapi.testclient import TestClient

import sam.callback
from sam.callback.app import create_app
from sam.callback.settings import Settings, load_settings
from sam.callback.spool import Spool
from tests.utils import auth_headers

SOURCE = Path(sam.callback.__file__).parent

# Modules and calls that do not exist (or do something else) on Windows.
POSIX_ONLY_MODULES = {"fcntl", "pwd", "grp", "resource", "termios", "tty", "pty", "posix", "syslog"}
POSIX_ONLY_CALLS = {
    "fork", "forkpty", "setsid", "setpgid", "getuid", "geteuid", "getgid", "getegid", "setuid", "setgid",
    "chown", "lchown", "killpg", "getpgid", "nice", "mkfifo", "getloadavg", "sync", "statvfs", "pathconf",
}  # fmt: skip
PORTABLE_SIGNALS = {"SIGINT", "SIGTERM", "SIGBREAK", "signal", "raise_signal", "Signals"}


@pytest.mark.parametrize(
    ("log_directory", "spool_path"),
    [
        ("C:/RPA/Logs/SAM", "C:/RPA/Data/SAM/spool.db"),
        (r"C:\RPA\Logs\SAM", r"C:\RPA\Data\SAM\spool.db"),
        (r"\\servidor\RPA\Logs\SAM", r"D:\Program Files\SAM Callback\data\spool.db"),
    ],
)
def test_settings_accept_windows_paths(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, log_directory: str, spool_path: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        f"CALLBACK_TOKEN=token-de-prueba-windows\nLOG_DIRECTORIO={log_directory}\nCALLBACK_SPOOL_PATH={spool_path}\n",
        encoding="utf-8",
    )
    settings = load_settings()
    assert isinstance(settings.log_directory, Path) and isinstance(settings.spool_path, Path)
    # What Windows will make of the same strings:
    assert PureWindowsPath(str(settings.log_file)) == PureWindowsPath(log_directory) / "sam_callback_server.log"
    assert PureWindowsPath(str(settings.spool_path)) == PureWindowsPath(spool_path)


def test_disk_paths_are_pathlib_paths() -> None:
    for name in ("spool_path", "log_directory"):
        assert Settings.model_fields[name].annotation is Path, name
    assert typing.get_type_hints(Spool.__init__)["path"] is Path
    assert Settings.model_fields["ssl_certfile"].annotation == Path | None


def test_paths_with_spaces_and_accents_work(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    base = tmp_path / "Program Files" / "SAM Callback ñ"
    settings = make_settings(log_directory=base / "Logs", spool_path=base / "Datos" / "spool.db")
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/api/callback", json={"deploymentId": "d-w", "status": "RUN_COMPLETED"}, headers=auth_headers()
        )
        assert answer.json()["code"] == "pending_match"
    assert (base / "Datos" / "spool.db").is_file()
    assert "deploymentId=d-w" in (base / "Logs" / "sam_callback_server.log").read_text(encoding="utf-8")


def _modules() -> list[tuple[str, ast.Module]]:
    return [(path.name, ast.parse(path.read_text(encoding="utf-8"))) for path in sorted(SOURCE.glob("*.py"))]


def _platform_guarded(tree: ast.Module) -> set[int]:
    """Nodes under `if sys.platform == ...` / `if os.name == ...`: each branch is for one platform."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and any(
            marker in ast.unparse(node.test) for marker in ("sys.platform", "os.name", "hasattr(signal")
        ):
            for child in [*node.body, *node.orelse]:
                guarded |= {id(inner) for inner in ast.walk(child)}
    return guarded


def test_no_posix_only_modules_or_calls() -> None:
    problems = []
    for name, tree in _modules():
        guarded = _platform_guarded(tree)
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                imported = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                problems += [f"{name}: import {m}" for m in imported if m.split(".")[0] in POSIX_ONLY_MODULES]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "os" and node.attr in POSIX_ONLY_CALLS:
                    problems.append(f"{name}:{node.lineno}: os.{node.attr}")
                if node.value.id == "signal" and node.attr not in PORTABLE_SIGNALS:
                    problems.append(f"{name}:{node.lineno}: signal.{node.attr}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("/tmp"):  # noqa: S108
                problems.append(f"{name}:{node.lineno}: ruta POSIX fija {node.value!r}")
    assert problems == []


def test_sigbreak_is_only_used_behind_a_guard() -> None:
    # signal.SIGBREAK exists only on Windows: reaching it must go through hasattr/getattr.
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "SIGBREAK":
                pytest.fail(f"{name}:{node.lineno}: signal.SIGBREAK sin comprobar la plataforma")
