"""Who may call (issue 4 items 3 and 4): the allowlist, X-Forwarded-For, and the failure throttle."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.auth import FailureThrottle
from sam.callback.settings import Settings
from tests.utils import auth_headers, wait_for

BODY = b'{"deploymentId":"red","status":"RUN_COMPLETED"}'
PROXY = "192.0.2.8"


@pytest.fixture
def service(make_settings: Callable[..., Settings]) -> Callable[..., Any]:
    """Open the app with these settings; `peer(address)` gives a client connecting from `address`."""

    @contextmanager
    def build(**overrides: Any) -> Iterator[Callable[[str], TestClient]]:
        app = create_app(make_settings(**overrides))
        clients: list[TestClient] = []

        def peer(address: str) -> TestClient:
            client = TestClient(app, client=(address, 40000))
            clients.append(client)
            return client

        with TestClient(app):  # runs the lifespan once for every peer
            yield peer
        for client in clients:
            client.close()

    return build


def post(client: TestClient, headers: dict[str, str] | None = None, *, token: bool = True) -> httpx.Response:
    """POST the callback, with the right token unless told otherwise."""
    base = auth_headers() if token else {"Content-Type": "application/json"}
    return client.post("/api/callback", content=BODY, headers=base | (headers or {}))


def test_allowlist_of_addresses_and_ranges(service: Callable[..., Any]) -> None:
    """Addresses and CIDR ranges, IPv4 and IPv6, pass; everybody else gets 403 before authentication."""
    with service(allowed_ips="10.0.0.0/8, 192.0.2.7, 2001:db8::/32") as peer:
        for allowed in ("10.1.2.3", "192.0.2.7", "2001:db8::1", "::ffff:10.9.9.9"):
            assert post(peer(allowed)).status_code == 202, allowed
        for refused in ("192.0.2.8", "11.0.0.1", "2001:db9::1", "::1", "127.0.0.1"):
            answer = post(peer(refused))
            assert answer.status_code == 403, refused
            assert answer.json()["code"] == "forbidden"
        # The allowlist answers first: a stranger learns nothing about the credentials.
        assert post(peer("192.0.2.8"), token=False).status_code == 403
        assert post(peer("10.1.2.3"), token=False).status_code == 401


def test_forwarded_for_is_ignored_from_untrusted_peers(service: Callable[..., Any]) -> None:
    """A client cannot claim an allowed address by sending X-Forwarded-For itself."""
    with service(allowed_ips="10.0.0.0/8") as peer:
        assert post(peer("203.0.113.5"), {"X-Forwarded-For": "10.1.2.3"}).status_code == 403
    with service(allowed_ips="10.0.0.0/8", trusted_proxies="192.0.2.0/28") as peer:
        assert post(peer("203.0.113.5"), {"X-Forwarded-For": "10.1.2.3"}).status_code == 403


def test_forwarded_for_is_honoured_from_trusted_proxies(service: Callable[..., Any]) -> None:
    """Behind a trusted proxy the client is the right-most hop that is not a trusted proxy."""
    with service(allowed_ips="10.0.0.0/8", trusted_proxies=f"{PROXY}, 172.16.0.0/12") as peer:
        gateway = peer(PROXY)
        assert post(gateway).status_code == 403  # the proxy itself is not allowed to call
        assert post(gateway, {"X-Forwarded-For": "10.1.2.3"}).status_code == 202
        assert post(gateway, {"X-Forwarded-For": "10.1.2.3, 172.16.5.5"}).status_code == 202
        # A forged left-most hop does not help: the hop the proxy saw is right-most.
        assert post(gateway, {"X-Forwarded-For": "10.1.2.3, 203.0.113.9"}).status_code == 403
        # A garbled hop ends what can be believed.
        assert post(gateway, {"X-Forwarded-For": "10.1.2.3, not-an-ip"}).status_code == 403
        assert post(gateway, {"X-Forwarded-For": "10.1.2.3, 10.1.2.4, " + "x" * 5000}).status_code == 403


def test_forwarded_hops_with_a_port_name_the_client(service: Callable[..., Any]) -> None:
    """IIS ARR and Azure Application Gateway write the client's port too: the address still counts."""
    with service(allowed_ips="10.0.0.0/8, 2001:db8::/32", trusted_proxies=PROXY) as peer:
        gateway = peer(PROXY)
        assert post(gateway, {"X-Forwarded-For": "10.1.2.3:51234"}).status_code == 202
        assert post(gateway, {"X-Forwarded-For": "[2001:db8::7]:51234"}).status_code == 202
        assert post(gateway, {"X-Forwarded-For": "2001:db8::7"}).status_code == 202
        assert post(gateway, {"X-Forwarded-For": "203.0.113.9:51234"}).status_code == 403


def test_a_forwarded_for_header_repeated_on_two_lines_counts_whole(service: Callable[..., Any]) -> None:
    """A proxy that adds its own X-Forwarded-For line: the client's forged first line does not win."""
    with service(allowed_ips="10.0.0.0/8", trusted_proxies=PROXY) as peer:
        gateway = peer(PROXY)
        forged = [("X-Forwarded-For", "10.1.2.3"), ("X-Forwarded-For", "203.0.113.9")]
        answer = gateway.post("/api/callback", content=BODY, headers=[*auth_headers().items(), *forged])
        assert answer.status_code == 403
        honest = [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-For", "10.1.2.3")]
        answer = gateway.post("/api/callback", content=BODY, headers=[*auth_headers().items(), *honest])
        assert answer.status_code == 202


def test_an_unreadable_forwarding_chain_is_nobody_the_allowlist_knows(service: Callable[..., Any]) -> None:
    """Behind a trusted proxy that the allowlist holds, a garbled or empty chain is refused, not the proxy's."""
    with service(allowed_ips=f"10.0.0.0/8, {PROXY}", trusted_proxies=PROXY) as peer:
        gateway = peer(PROXY)
        assert post(gateway).status_code == 202  # the proxy itself, with no forwarding header
        for chain in ("unknown", "", "10.1.2.3, garbage", "8.8.8.8:port:x"):
            answer = post(gateway, {"X-Forwarded-For": chain})
            assert answer.status_code == 403, chain


def test_repeated_failures_get_429_with_retry_after(service: Callable[..., Any]) -> None:
    """Past the limit an address gets 429 with Retry-After; a valid request from it still passes."""
    with service(auth_failures_limit=3) as peer:
        attacker = peer("203.0.113.66")
        for _ in range(3):
            assert post(attacker, {"X-Authorization": "adivina"}).status_code == 401
        for _ in range(5):
            answer = post(attacker, {"X-Authorization": "adivina"})
            assert answer.status_code == 429
            assert answer.json()["code"] == "too_many_requests"
            assert 1 <= int(answer.headers["retry-after"]) <= 60
        # A360 does not retry and many clients may share an address: valid credentials always pass.
        assert post(attacker).status_code == 202
        # Somebody else is not affected at all.
        neighbour = peer("203.0.113.67")
        assert post(neighbour, {"X-Authorization": "olvidado"}).status_code == 401
        assert post(neighbour).status_code == 202


def test_throttle_counts_the_forwarded_client_not_the_proxy(service: Callable[..., Any]) -> None:
    """Behind a gateway the counter belongs to the client the gateway forwarded."""
    with service(auth_failures_limit=2, trusted_proxies=PROXY) as peer:
        gateway = peer(PROXY)
        attacker = {"X-Forwarded-For": "198.51.100.1", "X-Authorization": "adivina"}
        for expected in (401, 401, 429, 429):
            assert post(gateway, attacker).status_code == expected
        assert post(gateway, {"X-Forwarded-For": "198.51.100.2", "X-Authorization": "adivina"}).status_code == 401
        assert post(gateway, {"X-Forwarded-For": "198.51.100.2"}).status_code == 202


def test_throttle_can_be_switched_off(service: Callable[..., Any]) -> None:
    """CALLBACK_AUTH_FAILURES_LIMIT=0: always 401."""
    with service(auth_failures_limit=0) as peer:
        attacker = peer("203.0.113.66")
        assert {post(attacker, {"X-Authorization": "x"}).status_code for _ in range(40)} == {401}


def test_throttled_failures_are_summarised_not_logged_one_by_one(
    make_settings: Callable[..., Settings],
) -> None:
    """A flood of failures writes a bounded number of log lines, and the summaries count every 429."""
    settings = make_settings(auth_failures_limit=2)
    app = create_app(settings)
    with TestClient(app, client=("203.0.113.66", 1)) as attacker:
        answers = [post(attacker, {"X-Authorization": "adivina"}).status_code for _ in range(200)]
    log_text = settings.log_file.read_text(encoding="utf-8")
    assert log_text.count("Autenticación fallida") == 2
    summaries = re.findall(r"limitados \(429\) desde el último resumen: (\d+); 203\.0\.113\.66=(\d+)", log_text)
    # The first at once, the rest when the service stops (or when the minute is over).
    assert len(summaries) == 2
    assert sum(int(total) for total, _ in summaries) == answers.count(429) == 198


def test_throttled_failures_are_summed_up_when_the_minute_is_over(
    make_settings: Callable[..., Settings],
) -> None:
    """Failures after the first of a minute reach the log without waiting for another failure."""
    settings = make_settings(auth_failures_limit=1)
    app = create_app(settings)
    app.state.runtime.throttle_summary_seconds = 0.2
    with TestClient(app, client=("203.0.113.67", 1)) as attacker:
        answers = [post(attacker, {"X-Authorization": "adivina"}).status_code for _ in range(10)]
        assert answers.count(429) == 9

        def summed_up() -> bool:
            return "desde el último resumen: 8; 203.0.113.67=8" in settings.log_file.read_text(encoding="utf-8")

        wait_for(summed_up, timeout=10, what="el resumen de los 429")
        assert "desde el último resumen: 1; 203.0.113.67=1" in settings.log_file.read_text(encoding="utf-8")


def test_throttle_memory_is_bounded_whatever_the_number_of_addresses() -> None:
    """Fifty thousand addresses fit in the configured number of counters; the newest are kept."""
    throttle = FailureThrottle(3, max_addresses=10_000)
    for n in range(50_000):
        throttle.fail(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", now=1000.0)
    assert len(throttle) == 10_000
    newest = "10.0.195.79"  # n = 49999
    assert throttle.fail(newest, now=1000.0) == (False, 60)
    for _ in range(2):
        throttle.fail(newest, now=1000.0)
    assert throttle.fail(newest, now=1000.0)[0] is True
    assert len(throttle) == 10_000


def test_throttle_window_ends() -> None:
    """After the minute the address starts again from zero."""
    throttle = FailureThrottle(2, window=60)
    assert [throttle.fail("a", now=t)[0] for t in (0, 1, 2)] == [False, False, True]
    assert throttle.fail("a", now=59)[1] == 1
    assert throttle.fail("a", now=60.5) == (False, 60)


def test_throttle_summary_memory_is_bounded(make_settings: Callable[..., Settings]) -> None:
    """The per-address summary of throttled failures is flushed before it grows past 1000 entries."""
    app = create_app(make_settings(auth_failures_limit=1))
    runtime = app.state.runtime
    with TestClient(app):
        for n in range(5000):
            runtime.note_throttled(f"198.18.{n >> 8}.{n & 255}")
            assert len(runtime.throttled_since_log) <= 1001
