"""Deployment files: the systemd units (verified by systemd-analyze when present) and the NSSM script."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sam.callback.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "linux" / "sam-callback.service"
SOCKET_UNIT = ROOT / "deploy" / "linux" / "sam-callback.socket"
NSSM_SCRIPT = ROOT / "deploy" / "windows" / "install-service.ps1"


def _unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat, as systemd allows)."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_systemd_unit_runs_the_service_hardened() -> None:
    unit = _unit_settings(UNIT.read_text(encoding="utf-8"))
    single = {key: values[-1] for key, values in unit.items()}
    assert single["ExecStart"].endswith("-m sam.callback serve")
    for key in ("User", "Group", "WorkingDirectory", "ReadWritePaths"):
        assert single.get(key), key
    assert single["KillSignal"] == "SIGTERM"
    assert single["Restart"] == "on-failure"
    assert single["RestartPreventExitStatus"] == "2"  # a configuration error is not retried
    # uvicorn's graceful shutdown lasts up to 30 s; systemd must wait longer before SIGKILL
    assert int(single["TimeoutStopSec"]) > 30
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictNamespaces": "yes",
        "SystemCallArchitectures": "native",
    }
    assert {key: single.get(key) for key in expected} == expected
    assert "@system-service" in unit["SystemCallFilter"]
    assert set(single["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    env = dict(value.split("=", 1) for value in unit["Environment"])
    # the spool and the logs live in the only writable folders
    writable = single["ReadWritePaths"].split()
    assert any(env["CALLBACK_SPOOL_PATH"].startswith(folder + "/") for folder in writable)
    assert env["LOG_DIRECTORY"] in writable and env["LOG_DIRECTORIO"] == env["LOG_DIRECTORY"]
    # The configuration file is the service's own .env, re-read on change (SPEC 11): not an
    # EnvironmentFile=, which systemd reads once and whose values would win over every reload.
    assert "EnvironmentFile" not in unit
    assert env["CALLBACK_ENV_FILE"] == "/etc/sam-callback/sam-callback.env"


def test_socket_unit_hands_the_port_to_the_service() -> None:
    socket_unit = _unit_settings(SOCKET_UNIT.read_text(encoding="utf-8"))
    service = _unit_settings(UNIT.read_text(encoding="utf-8"))
    # one TCP port, the default CALLBACK_SERVER_PORT, passed to one service process
    assert socket_unit["ListenStream"] == [str(Settings.model_fields["server_port"].default)]
    assert socket_unit["Accept"] == ["no"]
    assert socket_unit["BindIPv6Only"] == ["both"]
    assert int(socket_unit["Backlog"][0]) >= 1024
    assert socket_unit["WantedBy"] == ["sockets.target"]
    assert SOCKET_UNIT.name in service["Requires"]
    assert SOCKET_UNIT.name in service["After"]
    # LISTEN_PID names the process systemd starts: Python itself, not a shell in between
    assert service["ExecStart"][-1].split()[0].endswith("/python")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze no está instalado")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this interpreter, the rest unchanged.
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={sys.executable}", UNIT.read_text(encoding="utf-8"))
    unit = tmp_path / UNIT.name
    unit.write_text(text, encoding="utf-8")
    # the service Requires= the socket: verify loads it from the same folder
    socket_unit = tmp_path / SOCKET_UNIT.name
    socket_unit.write_text(SOCKET_UNIT.read_text(encoding="utf-8"), encoding="utf-8")
    done = subprocess.run(
        ["systemd-analyze", "verify", str(socket_unit), str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    problems = [line for line in done.stderr.splitlines() if UNIT.name in line or SOCKET_UNIT.name in line]
    assert problems == []


def test_nssm_script_covers_the_service_lifecycle() -> None:
    text = NSSM_SCRIPT.read_text(encoding="utf-8")
    assert re.search(r'ValidateSet\("install", "start", "stop", "restart", "remove", "status"\)', text)
    for setting in (
        "AppDirectory",
        "AppParameters",
        "AppStdout",
        "AppStderr",
        "AppRotateFiles",
        "AppStopMethodConsole",
        "AppKillProcessTree",
        "AppExit Default Restart",
        "AppExit 2 Exit",
        "AppRestartDelay",
    ):
        assert f"set $ServiceName {setting}" in text, setting
    assert '"-m sam.callback serve"' in text
    assert "remove $ServiceName confirm" in text
    assert "C:\\RPA\\Logs\\SAM" in text
    # the graceful stop waits longer than uvicorn's 30 s
    assert int(re.search(r"\$GracefulStopMs = (\d+)", text).group(1)) > 30000  # type: ignore[union-attr]
