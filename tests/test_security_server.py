"""Limits of issue 4 item 2 on a real server process: oversized heads, endless bodies, hostile bytes."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable

import httpx
import pytest

from sam.callback.server import MAX_HEAD_BYTES
from tests.utils import TOKEN, ServerProcess, auth_headers

VALID = b'{"deploymentId":"servidor-real","status":"RUN_COMPLETED"}'
BODY_LIMIT = 64 * 1024


def head(path: str = "/api/callback", *, extra: bytes = b"", length: int | None = None, chunked: bool = False) -> bytes:
    """A complete request head (blank line included) with the right token."""
    lines = [
        f"POST {path} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        f"X-Authorization: {TOKEN}".encode(),
        b"Content-Type: application/json",
    ]
    if length is not None:
        lines.append(f"Content-Length: {length}".encode())
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


def exchange(server: ServerProcess, request: bytes) -> bytes:
    """Send raw bytes and read until the server closes or stops talking; b'' when it just hung up."""
    received = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        # Refused mid-send: whatever it answered is still readable, or nothing is.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        try:
            while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
    return received


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer."""
    return int(answer.split(b" ", 2)[1])


def assert_serving(server: ServerProcess) -> None:
    """The server answers a valid callback normally."""
    answer = httpx.post(server.callback_url, content=VALID, headers=auth_headers(), timeout=10)
    assert answer.status_code == 202, answer.text


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """One real server with a 64 KiB body limit."""
    return server_factory(CALLBACK_MAX_BODY_BYTES=str(BODY_LIMIT), CALLBACK_AUTH_FAILURES_LIMIT="0").start()


def test_oversized_heads_are_refused_cleanly(server: ServerProcess) -> None:
    """100 KB and 1 MB headers, a 20 MB header, a long URL and many headers: 431 or a closed connection."""
    body = VALID
    just_under = b"X-Relleno: " + b"a" * (MAX_HEAD_BYTES - 1024) + b"\r\n"
    answer = exchange(server, head(extra=just_under, length=len(VALID)) + body)
    assert status_of(answer) == 202, answer[:300]
    cases = {
        "100 KB header": b"X-Grande: " + b"a" * 100_000 + b"\r\n",
        "1 MB header": b"X-Grande: " + b"a" * 1_000_000 + b"\r\n",
        "20 MB header": b"X-Grande: " + b"a" * 20_000_000 + b"\r\n",
        "10 000 small headers": b"".join(b"X-H%d: v\r\n" % n for n in range(10_000)),
        "100 KB Authorization": b"Authorization: Bearer " + b"a" * 100_000 + b"\r\n",
    }
    for name, extra in cases.items():
        answer = exchange(server, head(extra=extra, length=len(VALID)) + body)
        if answer:
            assert status_of(answer) == 431, (name, answer[:300])
            assert b'"code": "headers_too_large"' in answer, name
            assert b"connection: close" in answer.lower(), name
        assert_serving(server)
    answer = exchange(server, head(path="/api/callback?q=" + "a" * 200_000, length=len(VALID)) + body)
    assert not answer or status_of(answer) in (400, 431), answer[:300]
    assert_serving(server)
    assert "Traceback" not in server.console()


def test_requests_the_parser_cannot_read_get_the_json_envelope(server: ServerProcess) -> None:
    """A bad Content-Length, Content-Length with chunked, or no HTTP at all: a JSON 400, then the connection closes."""
    body = b'{"deploymentId":"x","status":"RUN_COMPLETED"}'
    broken = {
        "bad_length": b"POST /api/callback HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n" + body,
        "length_and_chunked": (
            b"POST /api/callback HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        ),
        "garbage": b"GARBAGE\r\n\r\n",
    }
    for name, request in broken.items():
        answer = exchange(server, request)
        assert status_of(answer) == 400, (name, answer[:300])
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in head.lower() and b"connection: close" in head.lower(), name
        envelope = json.loads(payload)
        assert envelope["status"] == "ERROR" and envelope["code"] == "bad_request" and envelope["request_id"], name
        assert head.lower().count(b"x-request-id: " + envelope["request_id"].encode()) == 1, name
    assert_serving(server)


def test_oversized_head_on_a_kept_alive_connection(server: ServerProcess) -> None:
    """A second request on the same connection is measured too."""
    first = head(length=len(VALID)) + VALID
    second = head(extra=b"X-Grande: " + b"a" * 100_000 + b"\r\n", length=len(VALID)) + VALID
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(first)
        answer = b""
        while not answer.endswith(b"}"):
            answer += sock.recv(65536)
        assert status_of(answer) == 202
        sock.sendall(second)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert status_of(received) == 431


def test_endless_chunked_body_is_cut_at_the_limit(server: ServerProcess) -> None:
    """Without Content-Length the server answers 413 and hangs up long before the client is done."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(head(chunked=True))
        chunk = b"a" * 4096
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        sent = 0
        # Far more than the limit is offered, and the final zero-length chunk never comes.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 40 * BODY_LIMIT:
                sock.sendall(frame)
                sent += len(chunk)
        answer = b""
        try:
            while part := sock.recv(65536):
                answer += part
        except ConnectionResetError:
            pass
    assert status_of(answer) == 413, answer[:300]
    assert b'"code": "payload_too_large"' in answer
    assert_serving(server)


def test_declared_content_length_over_the_limit_is_refused_before_the_body(server: ServerProcess) -> None:
    """A 10 GB Content-Length is answered at once; the server does not wait for the body."""
    answer = exchange(server, head(length=10 * 1024**3))
    assert status_of(answer) == 413
    assert_serving(server)


def test_hostile_bodies_over_the_wire(server: ServerProcess) -> None:
    """Nested, huge, badly encoded and NUL-laden bodies are 400 on the real server, which keeps serving."""
    prefix = b'{"deploymentId":"a","status":"RUN_COMPLETED","x":'
    bodies = [
        prefix + b"[" * 30_000 + b"]" * 30_000 + b"}",
        prefix + b"9" * 20_000 + b"}",
        prefix + b"1e99999}",
        b'{"deploymentId":"\xff\xfe","status":"RUN_COMPLETED"}',
        b'{"deploymentId":"a\\ud800","status":"RUN_COMPLETED"}',
        b'{"deploymentId":"a\\u0000","status":"RUN_COMPLETED"}',
        b'{"deploymentId":"a\x00","status":"RUN_COMPLETED"}',
        b"\x00" * 1000,
    ]
    with httpx.Client(timeout=10) as client:
        for body in bodies:
            answer = client.post(server.callback_url, content=body, headers=auth_headers())
            assert answer.status_code == 400, (body[:60], answer.text)
    # A malformed request line or header, or ambiguous framing (request smuggling), is the HTTP
    # parser's business: 400, and the server lives on.
    start = b"POST /api/callback HTTP/1.1\r\nHost: x\r\nX-Authorization: " + TOKEN.encode() + b"\r\n"
    framed = b"Content-Length: %d\r\n\r\n%s" % (len(VALID), VALID)
    garbage = [
        b"\x00\x01\x02\r\n\r\n",
        b"POST /api/callback HTTP/1.1\r\nX: \x00\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        start + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        start + b"Content-Length: 5\r\n" + framed,
        start + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        start + b"Content-Length: -1\r\n\r\n",
        start + b"Content-Length: 99999999999999999999999\r\n\r\n",
        start.replace(b"X-Authorization:", b"X-Authorization :") + framed,
        start.replace(b"\r\n", b"\n") + framed.replace(b"\r\n", b"\n"),
    ]
    for request in garbage:
        answer = exchange(server, request)
        assert not answer or status_of(answer) == 400, (request[:80], answer[:200])
    assert_serving(server)
    assert "Traceback" not in server.console()
