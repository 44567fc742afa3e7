"""Who is calling: API keys, HS256 JWTs, and per-job read tokens.

Where each is accepted (API.md, "Hardening"): API keys and user JWTs only in the
``Authorization`` header; a job's read token there or as ``?token=`` (EventSource cannot send
headers). A credential is looked at only when it is at most ``MAX_CREDENTIAL_BYTES`` long, and
JWT-decoded at most once: its unverified ``aud`` claim says which kind it claims to be, and only
that kind's secret is tried."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from starlette.requests import Request

from jobstream.errors import Forbidden, Unauthorized
from jobstream.settings import Settings
from jobstream.store import NOT_YOURS, JobRecord

#: What a read token is told when it tries anything but reading.
READ_ONLY = "A read token can only read the jobs it covers: use the API key or user token for this."
#: The audience of read tokens. A user JWT has none, so neither kind is accepted as the other
#: even if an operator gives both the same secret.
READ_AUDIENCE = "jobstream:read"
_ALGORITHMS = ["HS256"]
#: The longest credential (the whole ``Authorization`` value, or ``?token=``) looked at: longer
#: is 401 before any decoding. Read tokens are ~150 bytes; 8 KiB leaves user JWTs plenty of claims.
MAX_CREDENTIAL_BYTES = 8192
#: Read tokens verified once and remembered (by digest: the tokens themselves are not kept), the
#: oldest forgotten first. A read token has no expiry (it is good while its job exists, which every
#: request checks), and EventSource and polling clients present the same one again and again.
VERIFIED_READ_TOKENS = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    #: Set for a job's read token: the one job it may read.
    job_id: str | None = None
    #: Set for a read token of several jobs (POST /v1/read-tokens): the jobs it may read.
    job_ids: frozenset[str] | None = None
    #: Set for a read token of a tag: it reads the user's jobs that carry the tag.
    tag: str | None = None

    @property
    def read_only(self) -> bool:
        return self.job_id is not None or self.job_ids is not None or self.tag is not None

    def may_read(self, job: JobRecord) -> bool:
        if job.owner != self.user:
            return False
        if self.job_id is not None:
            return job.id == self.job_id
        if self.job_ids is not None:
            return job.id in self.job_ids
        return self.tag is None or self.tag in job.tags

    def may_read_id(self, job_id: str) -> bool:
        """False only when no job of that id can be this principal's to read, whatever its tags."""
        if self.job_id is not None:
            return job_id == self.job_id
        return self.job_ids is None or job_id in self.job_ids


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self._api_keys = [(key.encode(), user) for key, user in settings.api_keys.items()]
        self._jwt_secret = settings.jwt_secret
        self._token_secret = settings.token_secret
        self._verified: dict[bytes, Principal] = {}

    def issue_read_token(self, job_id: str, user: str) -> str:
        # No expiry claim: the token is good while its job exists, and job ids are never reused.
        return jwt.encode({"sub": user, "job": job_id, "aud": READ_AUDIENCE}, self._token_secret, algorithm="HS256")

    def issue_scoped_read_token(
        self, user: str, *, job_ids: Sequence[str] = (), tag: str | None = None, expires_at: int
    ) -> str:
        """A read token of several jobs (their ids packed: 100 fit a URL) or of a tag, until
        ``expires_at`` (epoch seconds)."""
        claims: dict[str, Any] = {"sub": user, "aud": READ_AUDIENCE, "exp": expires_at}
        if tag is not None:
            claims["tag"] = tag
        else:
            claims["jobs"] = pack_job_ids(job_ids)
        return jwt.encode(claims, self._token_secret, algorithm="HS256")

    def authenticate(self, request: Request, *, allow_query_token: bool = False) -> Principal:
        credential = _bearer(request)
        if credential is not None:
            principal = self._api_key_user(credential) or self._token(credential, read_only=False)
            if principal is None:
                raise Unauthorized("Invalid credentials.")
            return principal
        token = request.query_params.get("token") if allow_query_token else None
        if not token:
            raise Unauthorized("Missing credentials: send 'Authorization: Bearer <API key or token>'.")
        if len(token) > MAX_CREDENTIAL_BYTES:
            raise Unauthorized(f"The token is longer than {MAX_CREDENTIAL_BYTES} bytes.")
        principal = self._token(token, read_only=True)
        if principal is None:
            raise Unauthorized(
                "Invalid read token. The query accepts only a job's read token (?token=); "
                "send API keys and user JWTs in the Authorization header."
            )
        return principal

    def _api_key_user(self, credential: str) -> Principal | None:
        given = credential.encode()
        found: str | None = None
        # Compare against every key so timing does not reveal which prefix matched.
        for key, user in self._api_keys:
            if hmac.compare_digest(given, key):
                found = user
        return Principal(found) if found is not None else None

    def _token(self, credential: str, *, read_only: bool) -> Principal | None:
        """A read token or (unless ``read_only``) a user JWT, verified with the one secret its
        unverified audience points to: one decode at most, none for what is not a JWT."""
        digest = hashlib.blake2b(credential.encode(errors="surrogatepass"), digest_size=16).digest()
        known = self._verified.get(digest)
        if known is not None:
            return known
        claims = _unverified_claims(credential)
        if claims is None:
            return None
        audience = claims.get("aud")
        if audience == READ_AUDIENCE or (isinstance(audience, list) and READ_AUDIENCE in audience):
            principal = self._read_token(credential)
            # Only one that never expires: a time-bound one (exp, nbf) is verified every time.
            if principal is not None and "exp" not in claims and "nbf" not in claims:
                if len(self._verified) >= VERIFIED_READ_TOKENS:
                    del self._verified[next(iter(self._verified))]
                self._verified[digest] = principal
            return principal
        return None if read_only else self._user_jwt(credential)

    def _read_token(self, credential: str) -> Principal | None:
        try:
            claims = jwt.decode(
                credential,
                self._token_secret,
                algorithms=_ALGORITHMS,
                audience=READ_AUDIENCE,
                options={"require": ["sub", "aud"]},
            )
        except jwt.PyJWTError:
            return None
        user = claims.get("sub")
        if not isinstance(user, str):
            return None
        job, jobs, tag = claims.get("job"), claims.get("jobs"), claims.get("tag")
        if isinstance(job, str):
            return Principal(user, job_id=job)
        if isinstance(jobs, str) and "exp" in claims:
            job_ids = unpack_job_ids(jobs)
            return Principal(user, job_ids=job_ids) if job_ids else None
        if isinstance(tag, str) and "exp" in claims:
            return Principal(user, tag=tag)
        return None

    def _user_jwt(self, credential: str) -> Principal | None:
        if not self._jwt_secret:
            return None
        try:
            claims = jwt.decode(credential, self._jwt_secret, algorithms=_ALGORITHMS, options={"require": ["sub"]})
        except jwt.PyJWTError:
            return None
        sub = claims.get("sub")
        return Principal(sub) if isinstance(sub, str) and sub and _is_unicode(sub) else None


def _unverified_claims(credential: str) -> dict[str, Any] | None:
    """The payload of something shaped like a JWT (three dot-separated segments, the middle one a
    JSON object), unverified: only to choose which secret to verify it with."""
    parts = credential.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error, RecursionError):  # JSON errors are ValueErrors; a deep one recurses
        return None
    return claims if isinstance(claims, dict) else None


def _is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON's ``"\\ud800"`` decodes to one): no user
    id can be one, since nothing downstream could encode it."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    if len(header) > MAX_CREDENTIAL_BYTES:
        raise Unauthorized(f"The Authorization header is longer than {MAX_CREDENTIAL_BYTES} bytes.")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("Malformed Authorization header: expected 'Bearer <credential>'.")
    return value.strip()


def authorize_read(principal: Principal, job: JobRecord) -> None:
    if not principal.may_read(job):
        raise Forbidden(NOT_YOURS)


def possible_owner(principal: Principal, job_id: str) -> str:
    """The owner a job ``job_id`` must have for ``principal`` to read it, or '' when no job of that
    id can be theirs to read (a read token for other jobs). For a store read that fetches events
    in the same round trip as the job, only when this owner matches; authorize_read still decides."""
    return principal.user if principal.may_read_id(job_id) else ""


def pack_job_ids(job_ids: Sequence[str]) -> str:
    """Job ids (uuids) as one base64url string of their 16 bytes each: a third of their text."""
    return base64.urlsafe_b64encode(b"".join(uuid.UUID(job_id).bytes for job_id in job_ids)).decode().rstrip("=")


def unpack_job_ids(packed: str) -> frozenset[str] | None:
    try:
        raw = base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4))
    except (ValueError, binascii.Error):
        return None
    if not raw or len(raw) % 16:
        return None
    return frozenset(str(uuid.UUID(bytes=raw[i : i + 16])) for i in range(0, len(raw), 16))


def authorize_write(principal: Principal, job: JobRecord) -> None:
    if principal.read_only:
        raise Forbidden(READ_ONLY)
    authorize_read(principal, job)


def require_user(principal: Principal) -> None:
    """For creating, listing and issuing read tokens: a full credential, not a read token."""
    if principal.read_only:
        raise Forbidden(READ_ONLY)
