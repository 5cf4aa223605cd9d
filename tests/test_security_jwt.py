"""JWT attacks of issue 4: each one is a 401 that looks exactly like every other 401."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.settings import Settings
from tests.utils import TOKEN, Keys

BODY = b'{"deploymentId":"ataque-jwt","status":"RUN_COMPLETED"}'
AUDIENCE = "sam-callback"
ISSUER = "https://gateway.example/oauth"
# Headers that carry no information about the request: the clock and the per-request id.
VOLATILE_HEADERS = {"date", "x-request-id"}
INFINITE_EXP = b'{"exp": 1e999, "aud": "sam-callback", "iss": "https://gateway.example/oauth"}'


def b64(data: bytes | dict[str, Any]) -> str:
    """base64url without padding, as JWS compact serialisation uses it."""
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def good_claims(**extra: Any) -> dict[str, Any]:
    """Claims the service would accept."""
    now = int(time.time())
    return {"iat": now, "exp": now + 300, "aud": AUDIENCE, "iss": ISSUER, "sub": "gateway"} | extra


def attacks(keys: Keys, other: Keys) -> dict[str, str]:
    """Every token of issue 4 item 1, by name."""
    valid = keys.token(aud=AUDIENCE, iss=ISSUER)
    head, payload, signature = valid.split(".")
    public_pem = keys.public_pem.encode()
    hs_signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(good_claims())}"
    hs_signature = b64(hmac.new(public_pem, hs_signing_input.encode(), hashlib.sha256).digest())
    other_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(other.private.public_key()))
    other_der = other.private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    return {
        "alg_none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(good_claims())}.",
        "alg_None_with_signature": f"{b64({'alg': 'None'})}.{b64(good_claims())}.{signature}",
        "hs256_with_public_key_text": f"{hs_signing_input}.{hs_signature}",
        "kid_path_traversal": other.token(aud=AUDIENCE, iss=ISSUER, headers={"kid": "../../../../dev/null"}),
        "kid_sql_injection": other.token(aud=AUDIENCE, iss=ISSUER, headers={"kid": "x' UNION SELECT 'clave"}),
        "jku_points_elsewhere": other.token(aud=AUDIENCE, iss=ISSUER, headers={"jku": "https://evil.example/jwks"}),
        "x5u_points_elsewhere": other.token(aud=AUDIENCE, iss=ISSUER, headers={"x5u": "https://evil.example/c.pem"}),
        "jwk_embedded": other.token(aud=AUDIENCE, iss=ISSUER, headers={"jwk": other_jwk}),
        "x5c_embedded": other.token(aud=AUDIENCE, iss=ISSUER, headers={"x5c": [base64.b64encode(other_der).decode()]}),
        # Even the right key's signature does not make a key-choosing header acceptable.
        "jku_with_good_signature": keys.token(aud=AUDIENCE, iss=ISSUER, headers={"jku": "https://evil.example/k"}),
        "expired": keys.token(aud=AUDIENCE, iss=ISSUER, expires_in=-3600),
        "nbf_in_the_future": keys.token(aud=AUDIENCE, iss=ISSUER, nbf=now + 3600),
        "iat_in_the_future": keys.token(aud=AUDIENCE, iss=ISSUER, iat=now + 3600, expires_in=7200),
        "wrong_aud": keys.token(aud="otra-api", iss=ISSUER),
        "missing_aud": keys.token(iss=ISSUER),
        "wrong_iss": keys.token(aud=AUDIENCE, iss="https://evil.example"),
        "tampered_payload": f"{head}.{b64(good_claims(sub='admin', exp=now + 10**8))}.{signature}",
        "tampered_header": f"{b64({'alg': 'RS256', 'typ': 'JWT', 'x': 1})}.{payload}.{signature}",
        "signature_stripped": f"{head}.{payload}.",
        "another_keys_signature": other.token(aud=AUDIENCE, iss=ISSUER),
        "missing_exp": keys.token(aud=AUDIENCE, iss=ISSUER, exp=None),
        "exp_not_a_number": keys.token(aud=AUDIENCE, iss=ISSUER, exp="mañana"),
        "exp_a_numeric_string": keys.token(aud=AUDIENCE, iss=ISSUER, exp=str(now + 3600)),
        "iat_a_numeric_string": keys.token(aud=AUDIENCE, iss=ISSUER, iat=str(now)),
        "exp_a_boolean": keys.token(aud=AUDIENCE, iss=ISSUER, exp=True),
        "exp_infinite": f"{head}.{b64(INFINITE_EXP)}.{signature}",
        "token_100_kb": keys.token(aud=AUDIENCE, iss=ISSUER, relleno="a" * 100_000),
        "non_base64_parts": "eyJ!!!.***.$$$",
        "non_base64_signature": f"{head}.{payload}.%%%not-base64%%%",
        "header_not_json": f"{b64(b'not json')}.{payload}.{signature}",
        "header_is_a_list": f"{b64(b'[1, 2]')}.{payload}.{signature}",
        "payload_is_a_list": f"{head}.{b64(b'[1, 2]')}.{signature}",
        "two_parts": f"{head}.{payload}",
        "six_parts": ".".join([head, payload, signature, head, payload, signature]),
        "empty_parts": "..",
        "unicode": "ñandú.☃.💥",
    }


@pytest.fixture
def api(make_settings: Callable[..., Settings], keys: Keys) -> Iterator[TestClient]:
    """A service that trusts the gateway's key, with aud/iss pinned and no throttle to hide a 401."""
    settings = make_settings(
        jwt_public_key=keys.public_pem, jwt_audience=AUDIENCE, jwt_issuer=ISSUER, auth_failures_limit=0
    )
    with TestClient(create_app(settings)) as client:
        yield client


def post(api: TestClient, headers: dict[str, str]) -> httpx.Response:
    """POST the callback with these headers and a JSON content type."""
    # Raw UTF-8 bytes: an attacker is not bound to ASCII header values.
    raw = {name: value.encode() for name, value in headers.items()}
    return api.post("/api/callback", content=BODY, headers={"Content-Type": "application/json", **raw})


def fingerprint(response: httpx.Response) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Everything about an answer except the request id and the date."""
    body = response.json()
    assert set(body) == {"status", "code", "message", "request_id"}
    body.pop("request_id")
    headers = {k: v for k, v in response.headers.items() if k not in VOLATILE_HEADERS}
    return response.status_code, headers, body


def test_valid_gateway_jwt_is_accepted(api: TestClient, keys: Keys) -> None:
    """The baseline: the right key, audience and issuer get through."""
    assert post(api, {"Authorization": f"Bearer {keys.token(aud=AUDIENCE, iss=ISSUER)}"}).status_code == 202


def test_every_jwt_attack_is_an_identical_401(
    api: TestClient, keys: Keys, other_keys: Keys, make_settings: Callable[..., Settings]
) -> None:
    """All attacks, a missing credential and a wrong static token answer byte-for-byte alike."""
    baseline = fingerprint(post(api, {}))
    assert baseline[0] == 401
    assert baseline[1]["www-authenticate"] == 'Bearer realm="sam-callback"'
    assert baseline[2] == {"status": "ERROR", "code": "unauthorized", "message": "Credenciales ausentes o no válidas"}
    assert fingerprint(post(api, {"X-Authorization": "no-es-el-token"})) == baseline
    for name, token in attacks(keys, other_keys).items():
        response = post(api, {"Authorization": f"Bearer {token}"})
        assert fingerprint(response) == baseline, name
        assert response.headers["x-request-id"] in response.text


def test_attacks_do_not_pass_with_a_token_in_required_mode(
    make_settings: Callable[..., Settings], keys: Keys, other_keys: Keys
) -> None:
    """In required mode a valid static token does not carry a forged JWT."""
    settings = make_settings(
        auth_mode="required",
        jwt_public_key=keys.public_pem,
        jwt_audience=AUDIENCE,
        jwt_issuer=ISSUER,
        auth_failures_limit=0,
    )
    with TestClient(create_app(settings)) as api:
        for name, token in attacks(keys, other_keys).items():
            response = post(api, {"X-Authorization": TOKEN, "Authorization": f"Bearer {token}"})
            assert response.status_code == 401, name
        good = keys.token(aud=AUDIENCE, iss=ISSUER)
        assert post(api, {"X-Authorization": TOKEN, "Authorization": f"Bearer {good}"}).status_code == 202


def test_kid_cannot_choose_a_key_from_a_jwks(
    make_settings: Callable[..., Settings], keys: Keys, other_keys: Keys, tmp_path: Any
) -> None:
    """With a JWKS, a kid selects among the configured keys only; a forged signature under a known kid fails."""
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys.private.public_key())) | {"kid": "gw-1", "use": "sig"}
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk]}))
    settings = make_settings(jwt_public_key=str(jwks_file), auth_failures_limit=0)
    with TestClient(create_app(settings)) as api:
        assert post(api, {"Authorization": f"Bearer {keys.token(headers={'kid': 'gw-1'})}"}).status_code == 202
        assert post(api, {"Authorization": f"Bearer {keys.token()}"}).status_code == 202
        baseline = fingerprint(post(api, {}))
        for kid in ("gw-1", "gw-2", "", "../gw-1", "gw-1\x00"):
            forged = other_keys.token(headers={"kid": kid})
            assert fingerprint(post(api, {"Authorization": f"Bearer {forged}"})) == baseline, kid
        assert fingerprint(post(api, {"Authorization": f"Bearer {keys.token(headers={'kid': 'gw-2'})}"})) == baseline


def test_reasons_reach_the_log_only(make_settings: Callable[..., Settings], keys: Keys, other_keys: Keys) -> None:
    """The log says why each request failed; the answers never do."""
    settings = make_settings(
        jwt_public_key=keys.public_pem, jwt_audience=AUDIENCE, jwt_issuer=ISSUER, auth_failures_limit=0
    )
    tokens = attacks(keys, other_keys)
    with TestClient(create_app(settings)) as api:
        answers = [post(api, {"Authorization": f"Bearer {tokens[name]}"}).text for name in ("alg_none", "expired")]
    log_text = settings.log_file.read_text(encoding="utf-8")
    assert "algoritmo no permitido" in log_text
    assert "token caducado" in log_text
    for answer in answers:
        assert "algoritmo" not in answer
        assert "caducado" not in answer
