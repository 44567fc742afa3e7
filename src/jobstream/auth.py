"""Who is calling: API keys, HS256 JWTs, and per-job read tokens."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import jwt
from starlette.requests import Request

from jobstream.errors import Forbidden, Unauthorized
from jobstream.settings import Settings
from jobstream.store import JobRecord

#: The audience of read tokens. A user JWT has none, so neither kind is accepted as the other
#: even if an operator gives both the same secret.
READ_AUDIENCE = "jobstream:read"
_ALGORITHMS = ["HS256"]


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    #: Set for a read token: the one job it may read.
    job_id: str | None = None

    @property
    def read_only(self) -> bool:
        return self.job_id is not None


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self._api_keys = [(key.encode(), user) for key, user in settings.api_keys.items()]
        self._jwt_secret = settings.jwt_secret
        self._token_secret = settings.token_secret

    def issue_read_token(self, job_id: str, user: str) -> str:
        # No expiry claim: the token is good while its job exists, and job ids are never reused.
        return jwt.encode({"sub": user, "job": job_id, "aud": READ_AUDIENCE}, self._token_secret, algorithm="HS256")

    def authenticate(self, request: Request, *, allow_query_token: bool = False) -> Principal:
        credential = _bearer(request)
        if credential is None and allow_query_token:
            credential = request.query_params.get("token") or None
        if credential is None:
            raise Unauthorized("Missing credentials: send 'Authorization: Bearer <API key or token>'.")
        principal = self._api_key_user(credential) or self._read_token(credential) or self._user_jwt(credential)
        if principal is None:
            raise Unauthorized("Invalid credentials.")
        return principal

    def _api_key_user(self, credential: str) -> Principal | None:
        given = credential.encode()
        found: str | None = None
        # Compare against every key so timing does not reveal which prefix matched.
        for key, user in self._api_keys:
            if hmac.compare_digest(given, key):
                found = user
        return Principal(found) if found is not None else None

    def _read_token(self, credential: str) -> Principal | None:
        try:
            claims = jwt.decode(
                credential,
                self._token_secret,
                algorithms=_ALGORITHMS,
                audience=READ_AUDIENCE,
                options={"require": ["sub", "job", "aud"]},
            )
        except jwt.PyJWTError:
            return None
        if not isinstance(claims.get("sub"), str) or not isinstance(claims.get("job"), str):
            return None
        return Principal(claims["sub"], job_id=claims["job"])

    def _user_jwt(self, credential: str) -> Principal | None:
        if not self._jwt_secret:
            return None
        try:
            claims = jwt.decode(credential, self._jwt_secret, algorithms=_ALGORITHMS, options={"require": ["sub"]})
        except jwt.PyJWTError:
            return None
        sub = claims.get("sub")
        return Principal(sub) if isinstance(sub, str) and sub else None


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("Malformed Authorization header: expected 'Bearer <credential>'.")
    return value.strip()


def authorize_read(principal: Principal, job: JobRecord) -> None:
    if principal.user != job.owner or (principal.job_id is not None and principal.job_id != job.id):
        raise Forbidden("This job belongs to another user or token.")


def authorize_write(principal: Principal, job: JobRecord) -> None:
    if principal.read_only:
        raise Forbidden("A read token can only read its job.")
    authorize_read(principal, job)


def require_user(principal: Principal) -> None:
    """For creating jobs: a full credential, not a read token."""
    if principal.read_only:
        raise Forbidden("A read token can only read its job.")
