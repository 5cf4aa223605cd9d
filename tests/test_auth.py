"""Authentication modes of SPEC 3 over HTTP, with real RSA/EC keys signing the JWTs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.settings import ConfigError, Settings, load_settings
from tests.utils import TOKEN, Keys

BODY = b'{"deploymentId":"no-existe","status":"RUN_COMPLETED"}'
ACCEPTED = 202  # the run does not exist: a valid request ends as pending_match


def call(api: TestClient, **headers: str) -> int:
    return api.post("/api/callback", content=BODY, headers={"Content-Type": "application/json", **headers}).status_code


def bearer(token: str) -> str:
    return f"Bearer {token}"


@pytest.fixture
def app_with(make_settings: Callable[..., Settings]) -> Callable[..., TestClient]:
    def build(**overrides: Any) -> TestClient:
        return TestClient(create_app(make_settings(**overrides)))

    return build


def test_static_token_and_rotation_list(app_with: Callable[..., TestClient]) -> None:
    """CALLBACK_TOKEN is one value; the token being rotated out goes in CALLBACK_TOKENS_ANTERIORES."""
    new = "token-nuevo-0123456789abcdefghijklmn"
    with app_with(token=new, previous_tokens=f"{TOKEN}, otro-viejo-0123456789abcdefghijkl") as api:
        assert call(api, **{"X-Authorization": TOKEN}) == ACCEPTED
        assert call(api, **{"X-Authorization": new}) == ACCEPTED
        assert call(api, **{"X-Authorization": "otro"}) == 401
        assert call(api) == 401


def test_a_token_with_commas_is_one_token(app_with: Callable[..., TestClient]) -> None:
    """SAM's launcher sends CALLBACK_TOKEN verbatim: a comma inside it is part of the token."""
    with app_with(token=f"{TOKEN},resto") as api:
        assert call(api, **{"X-Authorization": f"{TOKEN},resto"}) == ACCEPTED
        assert call(api, **{"X-Authorization": TOKEN}) == 401
        assert call(api, **{"X-Authorization": "resto"}) == 401


def test_optional_mode_valid_jwt_alone(app_with: Callable[..., TestClient], keys: Keys) -> None:
    with app_with(jwt_public_key=keys.public_pem) as api:
        assert call(api, Authorization=bearer(keys.token())) == ACCEPTED


def test_optional_mode_expired_jwt_does_not_sink_a_valid_token(app_with: Callable[..., TestClient], keys: Keys) -> None:
    # The common case: the JWT was minted at deploy time and the run outlived it.
    with app_with(jwt_public_key=keys.public_pem) as api:
        expired = keys.token(expires_in=-3600)
        assert call(api, **{"X-Authorization": TOKEN, "Authorization": bearer(expired)}) == ACCEPTED
        assert call(api, Authorization=bearer(expired)) == 401
        assert call(api, **{"X-Authorization": "malo", "Authorization": bearer(keys.token())}) == ACCEPTED


def test_required_mode_needs_every_configured_kind(app_with: Callable[..., TestClient], keys: Keys) -> None:
    with app_with(auth_mode="required", jwt_public_key=keys.public_pem) as api:
        assert call(api, **{"X-Authorization": TOKEN, "Authorization": bearer(keys.token())}) == ACCEPTED
        assert call(api, **{"X-Authorization": TOKEN}) == 401
        assert call(api, Authorization=bearer(keys.token())) == 401
        assert call(api, **{"X-Authorization": TOKEN, "Authorization": bearer(keys.token(expires_in=-3600))}) == 401


def test_strict_is_the_old_name_of_required(make_settings: Callable[..., Settings]) -> None:
    assert make_settings(auth_mode="strict").auth_mode == "required"


def test_required_with_only_a_token(app_with: Callable[..., TestClient]) -> None:
    with app_with(auth_mode="required") as api:
        assert call(api, **{"X-Authorization": TOKEN}) == ACCEPTED
        assert call(api) == 401


def test_none_mode_accepts_anything(app_with: Callable[..., TestClient]) -> None:
    with app_with(auth_mode="none", token=None) as api:
        assert call(api) == ACCEPTED
        assert any("CALLBACK_AUTH_MODE=none" in w for w in api.get("/ready").json()["warnings"])


def test_jwt_claims_are_enforced(app_with: Callable[..., TestClient], keys: Keys, other_keys: Keys) -> None:
    with app_with(
        jwt_public_key=keys.public_pem, token=None, jwt_audience="sam", jwt_issuer="apic", jwt_leeway_seconds=30
    ) as api:
        good = {"aud": "sam", "iss": "apic"}
        assert call(api, Authorization=bearer(keys.token(**good))) == ACCEPTED
        assert call(api, Authorization=bearer(keys.token(expires_in=-10, **good))) == ACCEPTED  # within leeway
        assert call(api, Authorization=bearer(keys.token(expires_in=-120, **good))) == 401
        assert call(api, Authorization=bearer(keys.token(aud="otro", iss="apic"))) == 401
        assert call(api, Authorization=bearer(keys.token(aud="sam", iss="otro"))) == 401
        assert call(api, Authorization=bearer(keys.token(aud="sam", iss="apic", nbf=9_999_999_999))) == 401
        assert call(api, Authorization=bearer(other_keys.token(**good))) == 401
        no_exp = jwt.encode({"aud": "sam", "iss": "apic"}, keys.private, algorithm="RS256")
        assert call(api, Authorization=bearer(no_exp)) == 401


def test_client_id_header_and_claim(app_with: Callable[..., TestClient], keys: Keys) -> None:
    with app_with(jwt_public_key=keys.public_pem, token=None, api_gateway_client_id="cliente-123") as api:
        token = keys.token()
        assert call(api, Authorization=bearer(token), **{"x-ibm-client-id": "cliente-123"}) == ACCEPTED
        assert call(api, Authorization=bearer(token)) == 401
        assert call(api, Authorization=bearer(token), **{"x-ibm-client-id": "otro"}) == 401
        with_claim = keys.token(client_id="otro")
        assert call(api, Authorization=bearer(with_claim), **{"x-ibm-client-id": "cliente-123"}) == 401
        assert (
            call(api, Authorization=bearer(keys.token(client_id="cliente-123")), **{"x-ibm-client-id": "cliente-123"})
            == ACCEPTED
        )


def test_es256_and_ps256_when_listed(app_with: Callable[..., TestClient], keys: Keys) -> None:
    ec_private = ec.generate_private_key(ec.SECP256R1())
    ec_pem = (
        ec_private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    claims = {"exp": 9_999_999_999}
    with app_with(jwt_public_key=ec_pem, token=None, jwt_algorithms="ES256") as api:
        assert call(api, Authorization=bearer(jwt.encode(claims, ec_private, algorithm="ES256"))) == ACCEPTED
    with app_with(jwt_public_key=keys.public_pem, token=None, jwt_algorithms="PS256") as api:
        assert call(api, Authorization=bearer(jwt.encode(claims, keys.private, algorithm="PS256"))) == ACCEPTED
        # RS256 is not listed any more: the token cannot choose it.
        assert call(api, Authorization=bearer(keys.token())) == 401


def test_public_key_from_a_file_and_from_jwks(app_with: Callable[..., TestClient], keys: Keys, tmp_path: Path) -> None:
    pem_file = tmp_path / "gateway.pem"
    pem_file.write_text(keys.public_pem)
    with app_with(jwt_public_key=str(pem_file), token=None) as api:
        assert call(api, Authorization=bearer(keys.token())) == ACCEPTED
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys.private.public_key()))
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk | {"kid": "k1", "alg": "RS256", "use": "sig"}]}))
    with app_with(jwt_public_key=str(jwks_file), token=None) as api:
        assert call(api, Authorization=bearer(keys.token(headers={"kid": "k1"}))) == ACCEPTED
        assert call(api, Authorization=bearer(keys.token(headers={"kid": "k2"}))) == 401


def test_unparseable_key_or_missing_credentials_refuse_to_start(make_settings: Callable[..., Settings]) -> None:
    bad_pem = "-----BEGIN PUBLIC KEY-----\nnada\n-----END PUBLIC KEY-----"
    for overrides in ({"token": None}, {"auth_mode": "required"}):
        with pytest.raises(ConfigError) as bad_key:
            create_app(make_settings(jwt_public_key=bad_pem, **overrides))
        assert "JWT_CLAVE_PUBLICA/JWT_PUBLIC_KEY" in bad_key.value.problems[0]
    with pytest.raises(ConfigError) as no_credentials:
        load_settings(_env_file=None, token=None, auth_mode="required")
    assert "CALLBACK_AUTH_MODE" in no_credentials.value.problems[0]
    with pytest.raises(ConfigError) as hmac_algorithm:
        load_settings(_env_file=None, token=TOKEN, jwt_algorithms="HS256")
    assert "JWT_ALGORITHMS" in hmac_algorithm.value.problems[0]


@pytest.mark.parametrize(
    "unusable_key",
    [
        "placeholder_public_key",
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA...\n-----END PUBLIC KEY-----",
    ],
)
def test_unusable_key_with_a_token_in_optional_mode_is_a_warning(
    make_settings: Callable[..., Settings], keys: Keys, unusable_key: str
) -> None:
    """SAM's .env ships a placeholder key: the service serves with the token, refuses JWTs, and says why."""
    settings = make_settings(jwt_public_key=unusable_key)
    with TestClient(create_app(settings)) as api:
        warnings = api.get("/ready").json()["warnings"]
        assert any("JWT_CLAVE_PUBLICA" in warning for warning in warnings), warnings
        assert call(api, **{"X-Authorization": TOKEN}) == ACCEPTED
        assert call(api, Authorization=bearer(keys.token())) == 401
        assert call(api, Authorization=bearer(keys.token()), **{"X-Authorization": TOKEN}) == ACCEPTED
    log_text = settings.log_file.read_text(encoding="utf-8")
    assert "WARNING" in log_text and "JWT_CLAVE_PUBLICA" in log_text


def test_each_refusal_is_counted_under_its_own_reason(
    make_settings: Callable[..., Settings], keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The gateway's client id as operators set it, in the environment.
    monkeypatch.setenv("API_GATEWAY_CLIENT_ID", "cliente-metricas")
    settings = make_settings(jwt_public_key=keys.public_pem, token=None, auth_failures_limit=0)
    good = {"x-ibm-client-id": "cliente-metricas"}
    with TestClient(create_app(settings)) as api:
        assert call(api, Authorization=bearer(keys.token()), **good) == ACCEPTED
        assert call(api, Authorization=bearer(keys.token())) == 401
        assert call(api, Authorization=bearer(keys.token()), **{"x-ibm-client-id": "otro-cliente"}) == 401
        assert call(api, Authorization=bearer(keys.token(client_id="otro-cliente")), **good) == 401
        assert call(api, Authorization=bearer(keys.token(expires_in=-3600)), **good) == 401
        assert call(api) == 401
        assert call(api, Authorization=bearer(keys.token(headers={"jku": "https://evil.example/k"})), **good) == 401
        metrics = api.get("/metrics").text
    counted = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("sam_callback_auth_failures_total{")
    }
    # A wrong or missing x-ibm-client-id is the gateway's client id, not missing credentials.
    assert counted == {"client_id": 3, "jwt_expired": 1, "missing_credentials": 1, "key_choosing_header": 1}
