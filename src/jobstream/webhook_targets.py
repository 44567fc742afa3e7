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
from concurrent.futures import ThreadPoolExecutor

import httpx

#: A name that does not resolve at create is accepted (DNS may be down, or the name not yet
#: published); every attempt resolves it again.
CREATE_LOOKUP_TIMEOUT_S = 2.0
MAX_URL_LENGTH = 2048
#: Name lookups run here, not in the loop's default executor: lookups left running after their
#: timeout (a name server that never answers) cannot take the threads other work needs.
_LOOKUPS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-dns")
#: Prefixes whose addresses carry an IPv4 address in their last 32 bits: NAT64 (RFC 6052, RFC
#: 8215), IPv4-compatible and IPv4-translated (RFC 2765).
_CARRY_IPV4 = tuple(
    ipaddress.IPv6Network(net) for net in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96")
)


class TargetRefused(Exception):
    """A webhook URL that may not be called; the message says why, for a 422 or a log line."""


def parse(url: str) -> httpx.URL:
    """The URL, if it is an absolute http(s) URL with a host; else TargetRefused."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, TypeError, ValueError):  # ValueError: UnicodeError of a bad IDN label
        raise TargetRefused("is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise TargetRefused("must be an http:// or https:// URL")
    if not host:
        raise TargetRefused("must name a host")
    return parsed


def host_of(url: httpx.URL) -> str:
    """The host as it goes on the wire (an IDN in its ASCII form), lowercase."""
    return url.raw_host.decode("ascii").lower()


def port_of(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def is_allowed_host(url: httpx.URL, allowed_hosts: Collection[str]) -> bool:
    """Whether the operator allows the URL's host (``host``, or ``host:port`` for one port only)."""
    host, port = host_of(url), port_of(url)
    return bool({host, f"[{host}]", f"{host}:{port}", f"[{host}]:{port}"} & set(allowed_hosts))


def is_public(address: str) -> bool:
    """Not loopback, private, link-local, multicast, reserved or unspecified. An IPv6 address that
    carries an IPv4 one (mapped, compatible, 6to4, NAT64) is judged by it: a NAT64 gateway would
    take it there; Teredo and site-local addresses are refused."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None or ip.is_site_local:
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and any(ip in net for net in _CARRY_IPV4):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


async def resolve(url: httpx.URL) -> list[str]:
    """The addresses the URL's host resolves to (an address literal: itself). Raises OSError
    (socket.gaierror) when it does not resolve, TargetRefused when it cannot be a DNS name."""
    host = host_of(url)
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    lookup = asyncio.get_running_loop().run_in_executor(
        _LOOKUPS, socket.getaddrinfo, host, port_of(url), 0, socket.SOCK_STREAM
    )
    try:
        infos = await lookup
    except UnicodeError:  # a label longer than 63 characters, or empty
        raise TargetRefused("names a host that is not a valid DNS name") from None
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
