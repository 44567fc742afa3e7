"""Credentials out of text: the values of credential-looking ``name=value`` parameters (however
their names are encoded) and anything shaped like a JWT. Used for log lines and for what is sent
to Sentry."""

from __future__ import annotations

import functools
import re
import unicodedata
from urllib.parse import unquote_plus

#: ``name=value`` in a query (or any text): the separator or start, the raw name, the value.
_PARAMETER = re.compile(r"(^|[?&;])([^=&;?#\s]*)=([^&;#\s]*)")
#: Parameter names (decoded, NFKC, casefolded, only letters and digits kept) whose values are
#: credentials: anything naming a token, key, secret, password, signature, session or the like.
_CREDENTIAL_NAME = re.compile(
    r"token|secret|passw|passphrase|pwd|apikey|accesskey|privatekey|auth|credential|signature|session|jwt|bearer"
    r"|cookie|key$|^(?:sig|code|pass|pw)$"
)
#: A JWT (read tokens, user JWTs) wherever it appears: three base64url segments, the first a JSON object.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
REDACTED = "REDACTED"


@functools.lru_cache(maxsize=1024)
def credential_name(name: str) -> bool:
    """Whether a query parameter's raw name names a credential, however it is encoded: decoded
    until it no longer changes (``tok%65n``, ``tok%2565n``, ``to+ken``), then compared with case,
    width and punctuation dropped (``Access-Token``, ``API_KEY``, ``ａｐｉｋｅｙ``). Remembered per
    name (names, not values: no credential is kept): every access line asks again for the same
    few (``token``, ``after``, ``wait``)."""
    for _ in range(8):
        decoded = unquote_plus(name, errors="replace")
        if decoded == name:
            break
        name = decoded
    folded = unicodedata.normalize("NFKC", name).casefold()
    return _CREDENTIAL_NAME.search("".join(ch for ch in folded if ch.isalnum())) is not None


def redact(text: str, marker: str = REDACTED) -> str:
    """``text`` with the values of credential-looking ``name=value`` parameters, and any JWT,
    replaced by ``marker``."""

    if "=" in text:
        text = _PARAMETER.sub(lambda match: _parameter(match, marker), text)
    if "eyJ" in text:
        text = _JWT.sub(marker, text)
    return text


def _parameter(match: re.Match[str], marker: str) -> str:
    separator, name, value = match.groups()
    return f"{separator}{name}={marker}" if value and credential_name(name) else match.group(0)
