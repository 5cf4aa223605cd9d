"""Fuzzing in CI (issue 4 item 6): hypothesis over headers and bodies, schemathesis over the OpenAPI document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sam.callback.app import create_app
from sam.callback.responses import ANSWERS
from sam.callback.settings import Settings
from tests.utils import TOKEN, ServerProcess, auth_headers

# Every answer the callback path may give (SPEC 2.2), by HTTP status.
CALLBACK_STATUSES = {200, 202, 400, 401, 403, 405, 408, 413, 415, 429, 503}

header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=300)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
field_values = json_values | st.text(max_size=120) | st.integers(min_value=-(10**50), max_value=10**50)
callbacks = st.fixed_dictionaries(
    {},
    optional={
        "deploymentId": field_values,
        "status": field_values,
        "deviceId": field_values,
        "userId": field_values,
        "botOutput": json_values,
    },
).flatmap(lambda fixed: st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(lambda extra: extra | fixed))

# CI runs a fixed sample so that a red build always points at a change, not at luck; set
# SAM_FUZZ_RANDOM=1 locally to explore new inputs (failures print a seed to replay).
RANDOM_FUZZING = os.environ.get("SAM_FUZZ_RANDOM") == "1"


def encode(value: Any, style: str) -> bytes:
    """Serialise a generated JSON value in one of several hostile ways."""
    text = json.dumps(value, ensure_ascii=style == "ascii")
    if style == "surrogatepass":
        return text.encode("utf-8", "surrogatepass")
    return text.encode("utf-8", "replace")


bodies = st.one_of(
    st.tuples(callbacks, st.sampled_from(["ascii", "utf8", "surrogatepass"])).map(lambda pair: encode(*pair)),
    st.binary(max_size=600),
    st.tuples(callbacks, st.binary(max_size=20), st.integers(min_value=0, max_value=200)).map(
        lambda t: (lambda raw: raw[: t[2]] + t[1] + raw[t[2] :])(json.dumps(t[0]).encode())
    ),
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "X-Authorization": st.sampled_from([TOKEN, TOKEN + " ", " " + TOKEN, "", TOKEN[:-1]]) | header_text,
        "Authorization": st.sampled_from(["Bearer ", "Bearer a.b.c", "Basic eA=="]) | header_text,
        "Content-Type": st.sampled_from(
            ["application/json", "application/json; charset=utf-8", "text/plain", "application/x+json", "text/html"]
        )
        | header_text,
        "X-Forwarded-For": header_text,
        "X-Request-ID": header_text,
        "x-ibm-client-id": header_text,
        "Content-Encoding": st.sampled_from(["gzip", "br", "identity"]),
    },
)


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """The app in process, with 500s returned rather than raised."""
    with TestClient(create_app(make_settings(auth_failures_limit=0)), raise_server_exceptions=False) as client:
        yield client


def test_any_headers_and_body_get_a_documented_answer(api: TestClient) -> None:
    """Whatever arrives, the answer is a documented status in the envelope, never a 500; then it still serves."""

    @settings(
        max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=not RANDOM_FUZZING
    )
    @given(
        method=st.sampled_from(["POST"] * 8 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        request_headers=headers,
        body=bodies,
    )
    def any_request(method: str, request_headers: dict[str, str], body: bytes) -> None:
        raw_headers = {name: value.encode("latin-1") for name, value in request_headers.items()}
        answer = api.request(method, "/api/callback", content=body, headers=raw_headers)
        assert answer.status_code in CALLBACK_STATUSES, answer.text
        envelope = answer.json()
        assert ANSWERS[envelope["code"]][0] == answer.status_code
        assert envelope["request_id"] == answer.headers["x-request-id"]

    any_request()
    answer = api.post("/api/callback", content=b'{"deploymentId":"d","status":"RUN_FAILED"}', headers=auth_headers())
    assert answer.status_code == 202


# --- schemathesis against a real server process -------------------------------------------------


def test_openapi_document_is_honoured_by_a_real_server(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """schemathesis, every check on: documented statuses, content types and schemas, valid data accepted, invalid refused."""
    server = server_factory(CALLBACK_AUTH_FAILURES_LIMIT="0").start()
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", server.base_url + "/openapi.json",
        "--checks", "all",
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", "150",
        "--header", f"X-Authorization: {TOKEN}",
        "--request-timeout", "10",
        "--no-color",
        "--report", "junit", "--report-dir", str(tmp_path / "schemathesis"),
    ]  # fmt: skip
    if not RANDOM_FUZZING:
        command += ["--seed", "20261129"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout, report
    # The server is still serving, and nothing it answered was a bug.
    answer = httpx.post(
        server.callback_url, content=b'{"deploymentId":"tras-st","status":"RUN_FAILED"}', headers=auth_headers()
    )
    assert answer.status_code == 202
    console = server.console()
    assert "Traceback" not in console
    assert "internal_error" not in console
