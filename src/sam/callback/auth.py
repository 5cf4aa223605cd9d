"""Authentication of a callback: static tokens, gateway JWTs, and the failure throttle."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK, PyJWKSet
from jwt.algorithms import get_default_algorithms

from .domain import AuthFailure
from .settings import ConfigError, Settings

log = logging.getLogger("sam.callback.auth")

_MAX_TOKEN_LENGTH = 8192
# Header parameters that try to tell the verifier which key to trust; a gateway never needs
# them, and honouring any of them would let the caller choose the key.
KEY_VARIABLE = "JWT_CLAVE_PUBLICA/JWT_PUBLIC_KEY"
_KEY_CHOOSING_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c"})


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The verdict on one request; `reasons` are for the log and metrics only, never for the client."""

    ok: bool
    reasons: tuple[AuthFailure, ...] = ()


_ACCEPTED = AuthResult(ok=True)


class JwtVerifier:
    """Verifies gateway JWTs with keys and algorithms pinned by configuration."""

    def __init__(self, settings: Settings) -> None:
        self.algorithms = settings.jwt_algorithm_list
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self.leeway = settings.jwt_leeway_seconds
        self.client_ids = [value.encode() for value in settings.gateway_client_ids]
        self.keys = _load_keys(settings.jwt_public_key or "", self.algorithms)

    def verify(self, token: str, client_id_header: str | None) -> AuthFailure | None:
        """Return None when the token is valid, else the reason it is not."""
        if len(token) > _MAX_TOKEN_LENGTH:
            return AuthFailure.JWT_TOO_LONG
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return AuthFailure.JWT_MALFORMED
        if _KEY_CHOOSING_HEADERS & header.keys():
            return AuthFailure.KEY_CHOOSING_HEADER
        if header.get("alg") not in self.algorithms:
            return AuthFailure.JWT_ALGORITHM
        kid = header.get("kid")
        candidates = [key for key_id, key in self.keys if kid is None or key_id in (None, kid)]
        if not candidates:
            return AuthFailure.UNKNOWN_KID
        reason = AuthFailure.JWT_SIGNATURE
        for key in candidates:
            reason_or_claims = self._decode(token, key)
            if isinstance(reason_or_claims, AuthFailure):
                reason = reason_or_claims
                if reason is not AuthFailure.JWT_SIGNATURE:
                    break
                continue
            return self._check_client_id(reason_or_claims, client_id_header)
        return reason

    def _decode(self, token: str, key: Any) -> dict[str, Any] | AuthFailure:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            return AuthFailure.JWT_EXPIRED
        except jwt.ImmatureSignatureError:
            return AuthFailure.JWT_NOT_YET_VALID
        except jwt.InvalidAudienceError:
            return AuthFailure.JWT_AUDIENCE
        except jwt.InvalidIssuerError:
            return AuthFailure.JWT_ISSUER
        except jwt.MissingRequiredClaimError as exc:
            return _MISSING_CLAIMS.get(exc.claim, AuthFailure.JWT_MISSING_CLAIM)
        except jwt.InvalidSignatureError:
            return AuthFailure.JWT_SIGNATURE
        except jwt.PyJWTError:
            return AuthFailure.JWT_INVALID
        except Exception:
            # A key/algorithm mismatch or a malformed part surfaces as a plain error from the
            # crypto layer: it is still only an invalid token.
            return AuthFailure.JWT_INVALID
        # RFC 7519: exp, nbf and iat are JSON numbers. PyJWT reads "9999999999" (a string) as one.
        for name in _TIME_CLAIMS:
            if name in claims and (isinstance(claims[name], bool) or not isinstance(claims[name], int | float)):
                return AuthFailure.JWT_INVALID
        return claims

    def _check_client_id(self, claims: dict[str, Any], header: str | None) -> AuthFailure | None:
        if not self.client_ids:
            return None
        matched = None if header is None else self._known_client(header)
        if matched is None:
            return AuthFailure.CLIENT_ID_HEADER
        claim = claims.get("client_id")
        # The claim, when there is one, names the same client as the header.
        if claim is not None and not hmac.compare_digest(str(claim).encode(), matched):
            return AuthFailure.CLIENT_ID_CLAIM
        return None

    def _known_client(self, value: str) -> bytes | None:
        # Every configured id is compared (no early exit): the time does not say which one matched.
        candidate = value.encode()
        matches = [known for known in self.client_ids if hmac.compare_digest(candidate, known)]
        return matches[0] if matches else None


_TIME_CLAIMS = ("exp", "nbf", "iat")
_MISSING_CLAIMS = {
    "exp": AuthFailure.JWT_MISSING_EXP,
    "aud": AuthFailure.JWT_MISSING_AUD,
    "iss": AuthFailure.JWT_MISSING_ISS,
}


def _load_keys(value: str, algorithms: list[str]) -> list[tuple[str | None, Any]]:
    """Keys from PEM text, a PEM file, or a JWKS file; ConfigError when none parses."""
    text = value.strip()
    if not text.startswith("-----") and not text.startswith("{"):
        path = Path(text)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError:
            raise ConfigError([f"{KEY_VARIABLE}: no se puede leer el fichero de clave '{path}'"]) from None
    # Operators paste PEMs into .env files on one line with literal \n.
    text = text.replace("\\n", "\n")
    if text.startswith("{"):
        try:
            jwks = PyJWKSet.from_dict(json.loads(text))
        except (ValueError, jwt.PyJWTError):
            raise ConfigError([f"{KEY_VARIABLE}: el JWKS no es válido"]) from None
        if not all(_is_public(jwk) for jwk in jwks.keys):
            # A private key here is a leaked secret, an "oct" key an HMAC secret: neither belongs
            # in the verifier's configuration (the PEM path refuses a private key the same way).
            raise ConfigError(
                [f"{KEY_VARIABLE}: el JWKS contiene claves privadas o simétricas; configure solo claves públicas"]
            )
        keys = [(jwk.key_id, jwk.key) for jwk in jwks.keys]
        if not keys:
            raise ConfigError([f"{KEY_VARIABLE}: el JWKS no contiene claves públicas utilizables"])
        return keys
    available = get_default_algorithms()
    for algorithm in algorithms:
        if algorithm not in available:
            continue
        try:
            key = available[algorithm].prepare_key(text)
        except Exception:  # noqa: S112 - the next algorithm's key type may fit
            continue
        if hasattr(key, "private_bytes"):
            raise ConfigError([f"{KEY_VARIABLE}: contiene una clave privada; configure solo la clave pública"])
        return [(None, key)]
    raise ConfigError([f"{KEY_VARIABLE}: la clave pública no es un PEM válido para los algoritmos de JWT_ALGORITHMS"])


def _is_public(jwk: PyJWK) -> bool:
    return hasattr(jwk.key, "public_bytes") and not hasattr(jwk.key, "private_bytes")


class Authenticator:
    """Applies CALLBACK_AUTH_MODE to the credentials a request carries."""

    def __init__(self, settings: Settings) -> None:
        self.mode = settings.auth_mode
        self.tokens = [token.encode() for token in settings.tokens]
        self.jwt: JwtVerifier | None = None
        # Problems that do not stop the service, for the start-up log, /ready and `check`.
        self.warnings: list[str] = []
        # Why the configured key cannot be used, without what that means for this process.
        self.key_problems: list[str] = []
        if settings.jwt_public_key:
            try:
                self.jwt = JwtVerifier(settings)
            except ConfigError as exc:
                # SAM's .env ships a placeholder key: with a static token to fall back on, mode
                # optional can still serve (JWTs are refused); mode required, or no token, cannot.
                if self.mode == "required" and self.tokens:
                    # SAM's own service reads "strict" as "check X-Authorization"; here it is the older
                    # name of required, which needs the JWT too: say how to get SAM's behaviour.
                    raise ConfigError(
                        [
                            f"{problem} (CALLBACK_AUTH_MODO=required/strict exige también un JWT válido; "
                            "para aceptar solo CALLBACK_TOKEN, como el servicio de callback de SAM, use "
                            "CALLBACK_AUTH_MODO=optional)"
                            for problem in exc.problems
                        ]
                    ) from None
                if self.mode == "required" or (self.mode == "optional" and not self.tokens):
                    raise
                self.key_problems = list(exc.problems)
                self.warnings = [f"{problem}; los JWT se rechazan hasta que se corrija" for problem in exc.problems]

    def check(self, static_token: str | None, authorization: str | None, client_id: str | None) -> AuthResult:
        """Verdict for one request's headers."""
        if self.mode == "none":
            return _ACCEPTED
        if authorization is None and static_token is not None and (self.mode == "optional" or self.jwt is None):
            # The common case, a static token alone: the general rules below reach the same verdict.
            reason = self._check_token(static_token)
            if reason is None:
                return _ACCEPTED
        results: dict[str, AuthFailure | None] = {}
        if static_token is not None:
            results["token"] = self._check_token(static_token)
        if authorization is not None:
            results["jwt"] = self._check_bearer(authorization, client_id)
        reasons = tuple(reason for reason in results.values() if reason is not None)
        if self.mode == "required":
            needed = (["token"] if self.tokens else []) + (["jwt"] if self.jwt else [])
            missing = tuple(_ABSENT[kind] for kind in needed if kind not in results)
            ok = not missing and all(results[kind] is None for kind in needed)
            return AuthResult(ok=ok, reasons=reasons + missing)
        if not results:
            return AuthResult(ok=False, reasons=(AuthFailure.MISSING_CREDENTIALS,))
        return AuthResult(ok=any(reason is None for reason in results.values()), reasons=reasons)

    def _check_token(self, presented: str) -> AuthFailure | None:
        if not self.tokens:
            return AuthFailure.TOKEN_UNCONFIGURED
        candidate = presented.strip().encode()
        # Compare against every configured token so timing does not reveal which one matched.
        matched = False
        for token in self.tokens:
            matched |= hmac.compare_digest(candidate, token)
        return None if matched else AuthFailure.TOKEN_INVALID

    def _check_bearer(self, authorization: str, client_id: str | None) -> AuthFailure | None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return AuthFailure.BEARER_SCHEME
        if self.jwt is None:
            return AuthFailure.JWT_UNCONFIGURED
        return self.jwt.verify(token.strip(), client_id)


_ABSENT = {"token": AuthFailure.TOKEN_MISSING, "jwt": AuthFailure.JWT_MISSING}


class FailureThrottle:
    """Counts authentication failures per address per minute, in bounded memory."""

    def __init__(self, limit: int, *, window: float = 60.0, max_addresses: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._counters: OrderedDict[str, list[float]] = OrderedDict()

    def fail(self, address: str, now: float | None = None) -> tuple[bool, int]:
        """Record a failure; return (throttled, seconds until the window resets)."""
        if self.limit <= 0:
            return False, 0
        now = time.monotonic() if now is None else now
        counter = self._counters.get(address)
        if counter is None or now - counter[0] >= self.window:
            counter = [now, 0.0]
            self._counters[address] = counter
        self._counters.move_to_end(address)
        counter[1] += 1
        while len(self._counters) > self.max_addresses:
            self._counters.popitem(last=False)
        retry_after = max(1, int(counter[0] + self.window - now + 0.999))
        return counter[1] > self.limit, retry_after

    def __len__(self) -> int:
        return len(self._counters)
