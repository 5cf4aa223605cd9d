"""Our own listening sockets (listen.py): bound before the app starts, so a bad address is a configuration error."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.utils import TOKEN, run_cli


def test_an_address_that_does_not_resolve_stops_the_start_with_exit_code_2(tmp_path: Path) -> None:
    """One line naming the variable, no traceback, and nothing that says the service was ready."""
    result = run_cli(tmp_path, CALLBACK_TOKEN=TOKEN, CALLBACK_HOST="999.1.1.1", CALLBACK_PUERTO="0")
    assert result.returncode == 2, result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("Error de configuración")]
    assert len(problems) == 1 and "CALLBACK_HOST" in problems[0] and "999.1.1.1" in problems[0]
    assert "Traceback" not in result.stderr and "listo" not in result.stderr


def test_an_address_of_another_machine_stops_the_start_with_exit_code_2(tmp_path: Path) -> None:
    """192.0.2.1 (TEST-NET) is no address of this machine: it cannot be bound."""
    result = run_cli(tmp_path, CALLBACK_TOKEN=TOKEN, CALLBACK_HOST="192.0.2.1", CALLBACK_PUERTO="0")
    assert result.returncode == 2, result.stderr
    assert "no se puede escuchar en 192.0.2.1" in result.stderr and "Traceback" not in result.stderr
    assert "listo" not in result.stderr


def test_a_port_in_use_exits_1_before_saying_ready(tmp_path: Path) -> None:
    """Not a configuration error (the old instance may be stopping): exit 1, which service managers retry."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli(tmp_path, CALLBACK_TOKEN=TOKEN, CALLBACK_HOST="127.0.0.1", CALLBACK_PUERTO=str(port))
    assert result.returncode == 1, result.stderr
    assert f"No se puede escuchar en 127.0.0.1:{port}: el puerto ya está en uso" in result.stderr
    assert "listo" not in result.stderr and "Traceback" not in result.stderr
