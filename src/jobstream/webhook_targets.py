"""Where webhooks may go: http(s) URLs whose host resolves to public addresses only, unless the
operator lists the host in JOBSTREAM_WEBHOOK_ALLOWED_HOSTS. Checked when a job is created with a
webhook, and again before every attempt, whose connection then goes to an address checked here
(never to a fresh lookup of the name, which could answer otherwise in between).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Collection

import httpx

#: A name that does not resolve at create is accepted (DNS may be down, or the name not yet
#: published); every attempt resolves it again.
CREATE_LOOKUP_TIMEOUT_S = 2.0
MAX_URL_LENGTH = 2048


class TargetRefused(Exception):
    """A webhook URL that may not be called; the message says why, for a 422 or a log line."""


def parse(url: str) -> httpx.URL:
    """The URL, if it is an absolute http(s) URL with a host; else TargetRefused."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise TargetRefused("is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise TargetRefused("must be an http:// or https:// URL")
    if not parsed.host:
        raise TargetRefused("must name a host")
    return parsed


def is_allowed_host(url: httpx.URL, allowed_hosts: Collection[str]) -> bool:
    """Whether the operator allows the URL's host (``host``, or ``host:port`` for one port only)."""
    host = url.host.lower()
    port = url.port or (443 if url.scheme == "https" else 80)
    return host in allowed_hosts or f"{host}:{port}" in allowed_hosts or f"[{host}]:{port}" in allowed_hosts


def is_public(address: str) -> bool:
    """Not loopback, private, link-local, multicast, reserved or unspecified (an IPv4 address
    mapped into IPv6 is judged as itself)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def resolve(url: httpx.URL) -> list[str]:
    """The addresses the URL's host resolves to (an address literal: itself). Raises OSError
    (socket.gaierror) when it does not resolve."""
    host = url.host
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    port = url.port or (443 if url.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_addresses(url: httpx.URL, addresses: list[str]) -> None:
    """TargetRefused unless every address is public: one private answer among public ones is
    what a rebinding attack looks like."""
    for address in addresses:
        if not is_public(address):
            raise TargetRefused(
                f"resolves to a non-public address ({address}); allow its host with JOBSTREAM_WEBHOOK_ALLOWED_HOSTS"
            )


async def check_at_create(url: str, allowed_hosts: Collection[str]) -> str:
    """The URL as given, if a job may be created with it; else TargetRefused. A name that does not
    resolve (in time) is accepted: each attempt checks it again."""
    parsed = parse(url)
    if is_allowed_host(parsed, allowed_hosts):
        return url
    try:
        async with asyncio.timeout(CREATE_LOOKUP_TIMEOUT_S):
            addresses = await resolve(parsed)
    except (OSError, TimeoutError):
        return url
    check_addresses(parsed, addresses)
    return url
