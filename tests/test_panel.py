"""The operator page: opened in a real headless Chromium against a real server, after real callbacks."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from fastapi.testclient import TestClient
from websockets.sync.client import connect

from sam.callback.activity import CallbackEvent, ProcessActivity
from sam.callback.app import create_app
from sam.callback.panel import PanelView, render_page
from sam.callback.settings import ConfigError, Settings, load_settings
from sam.callback.spool import SpoolStats
from tests.utils import TOKEN, Keys, ServerProcess, auth_headers, free_port, insert_run, require_service, wait_for

CLIENT_ID = "cliente-apigw-del-panel-7f3a"
WRONG_TOKEN = "token-equivocado-del-panel-91b2"
HOSTILE_ID = '"><img src=x onerror=document.title=1>'
SCRIPT_ID = "<script>document.title=2</script>"
HOSTILE_STATUS = "<b>NEGRITA</b>"
TITLE = "sam-callback · panel"
UNUSABLE_KEY = "-----BEGIN PUBLIC KEY-----\\nZXN0byBubyBlcyB1bmEgY2xhdmU=\\n-----END PUBLIC KEY-----"
# (width, height) of the screens the page must read well on: two laptops and a phone.
SCREENS = ((1366, 700), (1280, 800), (400, 1200))
# Headless, and nothing of its own on the network (no updates, sync or background requests).
CHROMIUM_OPTIONS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
)  # fmt: skip


class Page(HTMLParser):
    """What a person reads on the page: titles, label/value pairs and table rows per section."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.pairs: dict[str, dict[str, str]] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.title = ""
        self.warnings: list[str] = []
        self._section = ""
        self._open: str | None = None
        self._text = ""
        self._label = ""
        self._row: list[str] | None = None
        self.feed(html)

    @property
    def text(self) -> str:
        """Every label, value and cell, joined."""
        values = [f"{k} {v}" for pairs in self.pairs.values() for k, v in pairs.items()]
        cells = [cell for rows in self.rows.values() for row in rows for cell in row]
        return "\n".join([*values, *cells])

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("h2", "dt", "dd", "td", "title") or (tag == "p" and dict(attrs).get("class") == "warn"):
            self._open, self._text = tag, ""
        elif tag == "tr":
            self._row = []

    def handle_data(self, data: str) -> None:
        if self._open:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        text = " ".join(self._text.split())
        if tag == "title" and self._open == "title" and not self.title:  # the document's, not an SVG bar's
            self.title = text
        elif tag == "h2":
            self._section = text
        elif tag == "dt":
            self._label = text
        elif tag == "dd":
            self.pairs.setdefault(self._section, {})[self._label] = text
        elif tag == "p" and self._open == "p":
            self.warnings.append(text)
        elif tag == "td" and self._row is not None:
            self._row.append(self._text.strip())
        elif tag == "tr" and self._row:
            self.rows.setdefault(self._section, []).append(self._row)
            self._row = None
        if tag == self._open:
            self._open = None


def chromium_executable() -> str:
    """Debian's Chromium; skip (fail under CI) when it is not installed."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        require_service("Chromium", "no se encuentra el ejecutable 'chromium' (apt-get install chromium)")
    assert executable is not None
    return executable


def chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run Debian's headless Chromium on `url`."""
    profile = tmp_path / f"chromium-{len(list(tmp_path.glob('chromium-*')))}"
    return subprocess.run(
        [chromium_executable(), *CHROMIUM_OPTIONS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def open_in_browser(tmp_path: Path, url: str) -> tuple[str, Page]:
    """The DOM Chromium built from the page, after it loaded (and after any script could run)."""
    result = chromium(tmp_path, url, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "<html" in result.stdout, result.stderr[-2000:]
    return result.stdout, Page(result.stdout)


def post(server: ServerProcess, deployment_id: str, status: str = "RUN_COMPLETED", **headers: str) -> httpx.Response:
    """One callback on its own connection, as A360 sends it."""
    return httpx.post(
        server.callback_url,
        json={"deploymentId": deployment_id, "status": status},
        headers=auth_headers() | headers,
        timeout=30,
    )


def assert_self_contained(page: Page) -> None:
    """Nothing on the page points at another host: no scripts, images, frames or styles from outside."""
    for tag, attrs in page.tags:
        for name in ("src", "href", "action", "srcset", "data", "formaction"):
            value = (attrs.get(name) or "").strip().lower()
            assert not re.match(r"^([a-z][a-z0-9+.-]*:|//)", value) or value.startswith("#"), (tag, name, value)
        assert tag not in ("script", "iframe", "object", "embed", "img", "link"), tag


def test_browser_shows_callbacks_counts_and_refusals_without_credentials(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, keys: Keys
) -> None:
    """After real callbacks, Chromium shows their ids, the counts and the refusals, and no credential."""
    for deployment_id in ("panel-run-1", "panel-run-2"):
        insert_run(f"sqlite:///{(tmp_path / 'sam.db').as_posix()}", deployment_id)
    server = server_factory(JWT_PUBLIC_KEY=keys.public_pem, API_GATEWAY_CLIENT_ID=CLIENT_ID).start()
    assert post(server, "panel-run-1").json()["code"] == "updated"
    assert post(server, "panel-run-2", "RUN_FAILED").json()["code"] == "updated"
    assert post(server, "panel-early-3").json()["code"] == "pending_match"
    expired = keys.token(expires_in=-3600)
    refused = post(
        server, "panel-refused-4", **{"X-Authorization": WRONG_TOKEN, "Authorization": f"Bearer {expired}",
                                     "x-ibm-client-id": CLIENT_ID},
    )  # fmt: skip
    assert refused.status_code == 401

    answer = httpx.get(server.base_url + "/panel", timeout=30)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    csp = answer.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert answer.headers["x-frame-options"] == "DENY"
    assert "no-store" in answer.headers["cache-control"]

    html, page = open_in_browser(tmp_path, server.base_url + "/panel")
    assert page.title == TITLE
    rows = {row[1]: row for row in page.rows["Últimos callbacks recibidos"]}
    assert rows["panel-run-1"][2:5] == ["RUN_COMPLETED", "updated", "127.0.0.1"]
    assert rows["panel-run-2"][2:4] == ["RUN_FAILED", "updated"]
    assert rows["panel-early-3"][3] == "pending_match"
    assert "panel-refused-4" not in html
    assert page.pairs["Callbacks desde el arranque"] == {"updated": "2", "pending_match": "1", "unauthorized": "1",
                                                         "total": "4"}  # fmt: skip
    assert page.pairs["Spool"]["Esperando su ejecución"] == "1"
    assert page.pairs["Estado"]["Base de datos"].startswith("responde")
    assert page.pairs["Estado"]["Autenticación"] == "optional"
    [refusal] = page.rows["Últimas peticiones rechazadas"]
    assert refusal[1] == "127.0.0.1"
    assert "token estático incorrecto" in refusal[2] and "caducado" in refusal[2]
    for secret in (TOKEN, WRONG_TOKEN, CLIENT_ID, expired, expired.split(".")[1]):
        assert secret not in html
        assert secret not in answer.text
    assert_self_contained(page)


def test_hostile_values_render_as_text_and_run_nothing(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """HTML and script in a deploymentId or status from an authenticated caller are shown, not obeyed."""
    server = server_factory().start()
    assert post(server, HOSTILE_ID).status_code == 202
    assert post(server, SCRIPT_ID, HOSTILE_STATUS).status_code == 202

    _, page = open_in_browser(tmp_path, server.base_url + "/panel")
    # The payloads set the title if they ever run.
    assert page.title == TITLE
    shown = {row[1]: row for row in page.rows["Últimos callbacks recibidos"]}
    assert HOSTILE_ID in shown
    assert shown[SCRIPT_ID][2].upper() == HOSTILE_STATUS.upper()
    assert_self_contained(page)
    assert not [tag for tag, _ in page.tags if tag in ("b", "img", "script")]
    filtered = httpx.get(server.base_url + "/panel", params={"deploymentId": "<script>"}, timeout=30)
    assert "&lt;script&gt;" in filtered.text and "<script>" not in filtered.text


def test_an_address_outside_the_admin_list_gets_403(server_factory: Callable[..., ServerProcess]) -> None:
    """With CALLBACK_ADMIN_ALLOWED_IPS excluding loopback, the page is refused with the JSON envelope."""
    server = server_factory(CALLBACK_ADMIN_ALLOWED_IPS="10.0.0.0/8").start()
    answer = httpx.get(server.base_url + "/panel", timeout=30)
    assert answer.status_code == 403
    assert answer.json()["code"] == "forbidden"
    assert "CALLBACK_ADMIN_ALLOWED_IPS" in answer.json()["message"]
    assert "<html" not in answer.text
    # The callback path is not affected by the admin list.
    assert post(server, "panel-403-callback").status_code == 202


def test_an_empty_admin_list_closes_the_page_to_everyone(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """`CALLBACK_ADMIN_ALLOWED_IPS=` (set to nothing, as the README says) is nobody, not the default."""
    (tmp_path / ".env").write_text("CALLBACK_ADMIN_ALLOWED_IPS=\n", encoding="utf-8")
    server = server_factory().start()
    answer = httpx.get(server.base_url + "/panel", timeout=30)
    assert answer.status_code == 403 and "<html" not in answer.text
    assert post(server, "panel-cerrado-callback").status_code == 202
    server.stop()
    # Unset, the default lets this machine in.
    (tmp_path / ".env").write_text("", encoding="utf-8")
    server.start()
    assert httpx.get(server.base_url + "/panel", timeout=30).status_code == 200


def test_several_processes_all_appear(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """With two worker processes the page lists callbacks received by both, and sums their counts."""
    server = server_factory(CALLBACK_SERVER_WORKERS="2")
    # Two fresh interpreters import the whole stack: on a loaded machine that takes a while.
    server.start(wait=False)
    wait_for(server._healthy, timeout=120, what="arranque de los dos workers")
    sent: list[str] = []

    def both_workers_shown() -> bool:
        deployment_id = f"panel-worker-{len(sent)}"
        assert post(server, deployment_id).status_code == 202
        sent.append(deployment_id)
        return _shows_both_workers(Page(httpx.get(server.base_url + "/panel", timeout=30).text), sent)

    wait_for(both_workers_shown, timeout=60, interval=0.2, what="callbacks de los dos procesos en el panel")

    def browser_shows_both() -> Page | None:
        # The page served to the browser may come from either worker, whose view of the other's
        # events is at most a second old: look again until it has caught up.
        _, page = open_in_browser(tmp_path, server.base_url + "/panel")
        return page if _shows_both_workers(page, sent) else None

    page = wait_for(browser_shows_both, timeout=60, interval=0.5, what="el navegador ve los dos procesos")
    assert {row[1] for row in page.rows["Últimos callbacks recibidos"]} == set(sent)
    assert page.pairs["Callbacks desde el arranque"]["total"] == str(len(sent))


def _shows_both_workers(page: Page, sent: list[str]) -> bool:
    """Two processes listed, every sent callback shown, and shown as received by both of them."""
    # Only with two processes listed does the table have its "Proceso" column (the last one).
    if len(page.pairs.get("Estado", {}).get("Procesos", "").split(",")) != 2:
        return False
    rows = page.rows.get("Últimos callbacks recibidos", [])
    return {row[1] for row in rows} >= set(sent) and len({row[-1] for row in rows if row[1] in sent}) == 2


def test_two_instances_on_one_spool_show_each_other(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Two services sharing a spool folder each list the callbacks the other received."""
    first, second = server_factory().start(), server_factory().start()
    assert post(first, "panel-instance-first").status_code == 202
    assert post(second, "panel-instance-second").status_code == 202

    def both_listed(server: ServerProcess) -> set[str]:
        page = Page(httpx.get(server.base_url + "/panel", timeout=30).text)
        rows = page.rows.get("Últimos callbacks recibidos", [])
        if not {row[1] for row in rows} >= {"panel-instance-first", "panel-instance-second"}:
            return set()
        return {row[-1] for row in rows}

    pids = wait_for(lambda: both_listed(first), what="los callbacks de la otra instancia en el panel")
    assert pids == {str(first.process.pid), str(second.process.pid)}  # type: ignore[union-attr]
    wait_for(lambda: both_listed(second), what="los callbacks de la primera instancia en el panel")
    # A stopped instance removes its record: its callbacks leave the other's page.
    assert second.stop() == 0
    _, page = open_in_browser(tmp_path, first.base_url + "/panel")
    assert [row[1] for row in page.rows["Últimos callbacks recibidos"]] == ["panel-instance-first"]


def _client(settings: Settings, address: str) -> TestClient:
    return TestClient(create_app(settings), client=(address, 50000))


def test_forwarded_address_counts_only_from_a_trusted_proxy(make_settings: Callable[..., Settings]) -> None:
    """The admin list applies to the client behind a trusted proxy, and ignores others' X-Forwarded-For."""
    settings = make_settings(admin_allowed_ips="10.0.0.0/8", trusted_proxies="127.0.0.1")
    with _client(settings, "127.0.0.1") as client:
        assert client.get("/panel", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 200
        assert client.get("/panel", headers={"X-Forwarded-For": "192.168.1.9"}).status_code == 403
        assert client.get("/panel").status_code == 403
    with _client(settings, "192.168.1.9") as client:
        assert client.get("/panel", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 403


def test_the_database_state_is_dated_when_the_writer_saw_it_change(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """ "NO responde desde ..." is when the outage began, not when somebody opened the page."""
    settings = make_settings(database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/sam")
    with _client(settings, "127.0.0.1") as client:
        answer = client.post(
            "/api/callback", json={"deploymentId": "d-1", "status": "RUN_FAILED"}, headers=auth_headers()
        )
        assert answer.json()["code"] == "queued"
        recorder = client.app.state.runtime.recorder  # type: ignore[attr-defined]
        began = recorder.database_state.since
        assert not recorder.database_state.available
        expected = f"desde {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(began))}"
        wait_for(lambda: expected in client.get("/panel").text, what="la hora en que empezó el corte en el panel")


def test_a_local_proxy_does_not_open_the_page_to_unreadable_clients(make_settings: Callable[..., Settings]) -> None:
    """Behind a proxy on the same host (loopback, the default admin list) only loopback clients get in."""
    settings = make_settings(trusted_proxies="127.0.0.1")
    with _client(settings, "127.0.0.1") as client:
        assert client.get("/panel", headers={"X-Forwarded-For": "127.0.0.1:51000"}).status_code == 200
        for chain in ("8.8.8.8", "8.8.8.8:5678", "[2001:db8::1]:1234", "unknown", "", "8.8.8.8, garbage"):
            assert client.get("/panel", headers={"X-Forwarded-For": chain}).status_code == 403, chain
        # HAProxy's `option forwardfor` adds its own line after the client's forged one.
        forged = [("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-For", "8.8.8.8")]
        assert client.get("/panel", headers=forged).status_code == 403


def test_filter_by_deployment_id_and_plot(make_settings: Callable[..., Settings]) -> None:
    """The filter keeps the matching callbacks only; the plot counts this minute's callbacks."""
    with _client(make_settings(), "127.0.0.1") as client:
        for deployment_id in ("filtro-A-1", "filtro-A-2", "otro-B-3"):
            client.post("/api/callback", json={"deploymentId": deployment_id, "status": "RUNNING"},
                        headers=auth_headers())  # fmt: skip
        page = Page(client.get("/panel", params={"deploymentId": "a-"}).text)
        assert [row[1] for row in page.rows["Últimos callbacks recibidos"]] == ["filtro-A-2", "filtro-A-1"]
        whole = client.get("/panel").text
        assert 'aria-label="Callbacks por minuto; máximo 3"' in whole


def test_a_bad_admin_list_stops_the_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A value that is not an address or range is one readable problem at start."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CALLBACK_TOKEN", TOKEN)
    monkeypatch.setenv("CALLBACK_ADMIN_ALLOWED_IPS", "127.0.0.1, intranet")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert raised.value.problems == [
        "CALLBACK_ADMIN_ALLOWED_IPS: 'intranet' no es una dirección IP ni un rango CIDR válido"
    ]


def test_the_page_is_not_framable_and_not_cached(make_settings: Callable[..., Settings]) -> None:
    """Headers forbid framing and caching; the inline style is allowed by its nonce, nothing else is."""
    with _client(make_settings(), "::1") as client:
        answer = client.get("/panel")
    assert answer.status_code == 200
    csp = dict(part.strip().split(" ", 1) for part in answer.headers["content-security-policy"].split(";"))
    assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'none'"
    nonce = re.search(r"'nonce-([^']+)'", csp["style-src"])
    assert nonce is not None and f'<style nonce="{nonce.group(1)}">' in answer.text
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["cache-control"] == "no-store"


def test_every_warning_of_ready_is_on_the_page(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """Mode optional with a static token serves despite an unusable JWT key: /ready and the page both warn of it."""
    # As SAM's .env carries a key: on one line, with literal \n.
    server = server_factory(JWT_PUBLIC_KEY=UNUSABLE_KEY).start()
    ready = httpx.get(server.base_url + "/ready", timeout=30).json()
    assert [warning for warning in ready["warnings"] if "no es un PEM válido" in warning]

    _, page = open_in_browser(tmp_path, server.base_url + "/panel")
    assert page.title == TITLE
    assert set(ready["warnings"]) <= set(page.warnings)
    assert any(
        warning.startswith("JWT_CLAVE_PUBLICA/JWT_PUBLIC_KEY: la clave pública no es un PEM válido")
        for warning in page.warnings
    )


def test_mode_none_is_warned_of_as_ready_does(make_settings: Callable[..., Settings]) -> None:
    """The page's warnings are /ready's, in the same words."""
    with _client(make_settings(auth_mode="none"), "127.0.0.1") as client:
        ready = client.get("/ready").json()
        page = Page(client.get("/panel").text)
    assert ready["warnings"] == ["CALLBACK_AUTH_MODE=none: el endpoint no exige autenticación"]
    assert page.warnings == ready["warnings"]


# Evaluated in the page once it has loaded: where each label and value of each card ended up.
LAYOUT_PROBE = """(() => {
  const lines = (element) => {
    const range = document.createRange();
    range.selectNodeContents(element);
    return 1 + Math.floor(range.getBoundingClientRect().height / parseFloat(getComputedStyle(element).lineHeight));
  };
  const root = document.documentElement;
  const report = {width: innerWidth, scrollWidth: root.scrollWidth, clientWidth: root.clientWidth, items: []};
  for (const card of document.querySelectorAll(".card")) {
    const box = card.getBoundingClientRect();
    const title = card.querySelector("h2").textContent;
    for (const element of card.querySelectorAll("dt, dd, p.warn")) {
      const rect = element.getBoundingClientRect();
      report.items.push({card: title, tag: element.tagName.toLowerCase(), text: element.textContent.trim(),
                         lines: lines(element), inside: rect.left >= box.left - 0.5 && rect.right <= box.right + 0.5});
    }
  }
  return report;
})()"""


def measure_in_browser(tmp_path: Path, url: str, *, width: int, height: int, expression: str) -> Any:
    """Open `url` in headless Chromium on a `width` x `height` screen; return what `expression` evaluates to there.

    Driven over the DevTools protocol: Chromium's own --dump-dom cannot make a window narrower than
    500 px, and the page's CSP would refuse a script of ours (DevTools' evaluation is not subject to
    it). Narrow screens are emulated as a phone, which honours the page's viewport meta tag. A
    screenshot is left in `tmp_path` for whoever looks into a failure.
    """
    profile = tmp_path / f"chromium-{len(list(tmp_path.glob('chromium-*')))}"
    command = [chromium_executable(), *CHROMIUM_OPTIONS, f"--user-data-dir={profile}", "--remote-debugging-port=0"]
    process = subprocess.Popen([*command, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Chromium writes the port it chose, then the browser's WebSocket path.
        port_file = profile / "DevToolsActivePort"
        port, path = wait_for(lambda: _complete_lines(port_file, 2), timeout=60, what="el puerto DevTools de Chromium")
        with connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=30) as devtools:
            messages = iter(lambda: json.loads(devtools.recv(timeout=60)), None)
            sequence = iter(range(1, 1_000_000))

            def call(method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
                number = next(sequence)
                request = {"id": number, "method": method, "params": params}
                devtools.send(json.dumps(request if session is None else request | {"sessionId": session}))
                for message in messages:
                    if message.get("id") == number:
                        assert "error" not in message, message
                        return cast(dict[str, Any], message["result"])
                raise AssertionError(method)

            target = call("Target.createTarget", url="about:blank")["targetId"]
            session = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            call(
                "Emulation.setDeviceMetricsOverride",
                session,
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=width < 600,
            )
            call("Page.enable", session)
            call("Page.navigate", session, url=url)
            # recv's own timeout bounds the wait for the page to load.
            next(m for m in messages if m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session)
            shot = call("Page.captureScreenshot", session, format="png")["data"]
            (tmp_path / f"panel-{width}x{height}.png").write_bytes(base64.b64decode(shot))
            answer = call("Runtime.evaluate", session, expression=expression, returnByValue=True)
            assert "exceptionDetails" not in answer, answer
            return answer["result"]["value"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _complete_lines(path: Path, count: int) -> list[str] | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    return lines[:count] if len(lines) >= count and all(lines[:count]) else None


def _busy_view() -> PanelView:
    """A long-running service's numbers: 5-7 digit counts, long error texts, two processes."""
    now = time.time()
    sql_error = (
        "(pyodbc.ProgrammingError) ('42S22', \"[42S22] [Microsoft][ODBC Driver 18 for SQL Server][SQL Server] "
        "El nombre de columna 'CallbackInfo' no es válido. (207) (SQLExecDirectW)\")"
    )
    callbacks: list[CallbackEvent] = [
        (
            now - index * 7,
            index,
            f"a1b2c3d4-e5f6-4a7b-8c9d-{index:012d}",
            "RUN_COMPLETED",
            "updated",
            "10.20.30.40",
            f"3f6c0a9e8d7b6c5a4f3e2d1c{index:08d}",
        )
        for index in range(5)
    ]
    refused = [(now - 60, "10.20.30.41", "token estático incorrecto; JWT caducado (exp en el pasado)")]
    return PanelView(
        now=now,
        database_up=False,
        database_since=now - 3 * 3600,
        database_error="OperationalError",
        auth_mode="optional",
        warnings=[
            "JWT_CLAVE_PUBLICA/JWT_PUBLIC_KEY: la clave pública no es un PEM válido para los algoritmos de "
            "JWT_ALGORITHMS; los JWT se rechazan hasta que se corrija",
            f"Último error de la base de datos: {sql_error}",
        ],
        spool=SpoolStats(
            queued=1_234_567,
            pending=98_765,
            unmatched=4_620_462,
            oldest_received_at=now - 9 * 86400,
            refused=123_456,
            refused_error=sql_error,
        ),
        rejected=7_654_321,
        counts={
            "updated": 9_876_543,
            "pending_match": 4_620_462,
            "already_processed": 123_456,
            "unauthorized": 1_234_567,
            "invalid_payload": 54_321,
            "queued": 1_234_567,
        },
        processes=[
            ProcessActivity(
                pid=4_194_301,
                started_at=now - 40 * 86400,
                written_at=now,
                callbacks=callbacks,
                refused=refused,
                per_minute={int(now // 60): 12_345},
            ),
            ProcessActivity(
                pid=4_194_302, started_at=now - 40 * 86400, written_at=now, callbacks=[], refused=[], per_minute={}
            ),
        ],
        deployment_filter="",
    )


@pytest.mark.parametrize(("width", "height"), SCREENS)
def test_cards_read_normally_on_laptops_and_a_phone(tmp_path: Path, width: int, height: int) -> None:
    """With big numbers and long errors every label and value stays whole inside its card, and nothing scrolls sideways."""
    page = tmp_path / "panel.html"
    page.write_text(render_page(_busy_view(), nonce="n"), "utf-8")
    report = measure_in_browser(tmp_path, page.as_uri(), width=width, height=height, expression=LAYOUT_PROBE)
    assert report["width"] == width, "la página es más ancha que la pantalla"
    assert report["scrollWidth"] <= report["clientWidth"], "la página se desplaza en horizontal"
    items = report["items"]
    assert {item["card"] for item in items} >= {"Estado", "Spool", "Callbacks desde el arranque"}
    assert [item for item in items if not item["inside"]] == []
    # A number on one line; a label or value broken only between words (never one letter per line).
    assert [item for item in items if item["text"].isdigit() and item["lines"] != 1] == []
    assert [item for item in items if item["lines"] > len(item["text"].split())] == []
    spool = {item["text"] for item in items if item["card"] == "Spool"}
    assert {"1333332", "1234567", "98765", "4620462", "7654321"} <= spool


def test_long_tables_say_they_show_the_newest_rows_and_no_control_character_reaches_the_page() -> None:
    """152 callbacks: the page says it shows 100 of them; a NUL in the filter is shown as text, not sent raw."""
    now = time.time()
    view = _busy_view()
    many: list[CallbackEvent] = [
        (now - index, index, f"dep-{index}", "RUN_COMPLETED", "updated", "10.0.0.1", f"req-{index}")
        for index in range(152)
    ]
    process = view.processes[0]
    busy = ProcessActivity(
        pid=process.pid, started_at=process.started_at, written_at=now, callbacks=many, refused=[], per_minute={}
    )
    page = render_page(dataclasses.replace(view, processes=[busy], deployment_filter="dep\x00<b>"), nonce="n")
    assert "\x00" not in page
    assert 'value="dep\\u0000&lt;b&gt;"' in page
    assert "Ningún callback recibido (con este filtro)" in page
    unfiltered = render_page(dataclasses.replace(view, processes=[busy]), nonce="n")
    assert "Solo se muestran las 100 filas más recientes de 152 (el filtro busca en todos)." in unfiltered
    assert "401, 403, 429" in unfiltered  # the plot says what it leaves out
