"""HTTPS served directly (issue 4 item 5), with a certificate authority the test makes."""

from __future__ import annotations

import socket
import ssl
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trustme

from tests import utils
from tests.utils import ServerProcess, auth_headers, wait_for

VALID = b'{"deploymentId":"tls","status":"RUN_COMPLETED"}'


def run_cli(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m sam.callback` with these settings; it must not get as far as serving."""
    values = utils.isolated_env(tmp_path) | {"CALLBACK_TOKEN": "t" * 40}
    return utils.run_cli(tmp_path, **(values | env))


@pytest.fixture
def ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and its key, as PEM files."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "server.crt", tmp_path / "server.key"
    certfile.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    return certfile, keyfile


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client that trusts only the test CA."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def handshake(port: int, context: ssl.SSLContext) -> str | None:
    """The negotiated TLS version."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version()


def test_https_is_served_with_tls_1_2_at_least(
    server_factory: Callable[..., ServerProcess], tls_files: tuple[Path, Path], ca: trustme.CA
) -> None:
    """The callback works over HTTPS; TLS 1.3 and 1.2 are offered, 1.1 and 1.0 are refused, plain HTTP gets nothing."""
    certfile, keyfile = tls_files
    server = server_factory(CALLBACK_SSL_CERTFILE=str(certfile), CALLBACK_SSL_KEYFILE=str(keyfile)).start(wait=False)
    url = f"https://127.0.0.1:{server.port}"
    context = client_context(ca)

    def healthy() -> bool:
        assert server.process is not None and server.process.poll() is None, server.console()
        try:
            return httpx.get(url + "/health", verify=context, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, what="arranque del servidor HTTPS")
    answer = httpx.post(url + "/api/callback", content=VALID, headers=auth_headers(), verify=context, timeout=10)
    assert answer.status_code == 202, answer.text

    assert handshake(server.port, context) == "TLSv1.3"
    tls12 = client_context(ca)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(server.port, tls12) == "TLSv1.2"

    for old in ("TLSv1", "TLSv1_1"):
        legacy = client_context(ca)
        # Let the client offer the old protocol, so that the refusal is the server's.
        legacy.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            legacy.minimum_version = legacy.maximum_version = getattr(ssl.TLSVersion, old)
        with pytest.raises(ssl.SSLError) as refused:
            handshake(server.port, legacy)
        assert "NO_PROTOCOLS_AVAILABLE" not in str(refused.value), "the client itself refused; the test proves nothing"

    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5)
    # A certificate from anybody else is not trusted by a client that pins the CA: the usual check.
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", verify=client_context(trustme.CA()), timeout=5)
    assert "Traceback" not in server.console()


def test_unusable_certificate_or_key_stops_the_start(
    tmp_path: Path, tls_files: tuple[Path, Path], ca: trustme.CA
) -> None:
    """A key that does not match, a file that is not PEM, or an encrypted key: one clear line, exit 2."""
    certfile, keyfile = tls_files
    other_key = tmp_path / "other.key"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("no soy un certificado\n")
    encrypted = tmp_path / "encrypted.key"
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(keyfile.read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secreto"),
        )
    )
    for cert, key_path in ((certfile, other_key), (garbage, keyfile), (certfile, garbage), (certfile, encrypted)):
        result = run_cli(tmp_path, CALLBACK_SSL_CERTFILE=str(cert), CALLBACK_SSL_KEYFILE=str(key_path))
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert "Traceback" not in output
        assert "CALLBACK_SSL_CERTFILE" in output
        assert "secreto" not in output
