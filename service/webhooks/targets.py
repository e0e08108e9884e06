"""Which URLs a webhook may reach (SSRF protection).

A URL is ``http``/``https`` with a host and no credentials. Its host is resolved and every address checked:
private, loopback, link-local, multicast, reserved, unspecified and shared (carrier-grade NAT) addresses are
refused unless ``WEBHOOK_ALLOW_PRIVATE`` is set, and cloud metadata endpoints always. The check runs when the job
is submitted (the API answers 422) and again before each delivery attempt, whose connection then goes to the
address just checked, so a name that re-resolves elsewhere (DNS rebinding) cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048
# Instance metadata services (AWS/GCP/Azure/OpenStack, AWS ECS and IPv6, Alibaba): never a webhook's target.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"))

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(ValueError):
    """The URL may not be used as a webhook; the message says why."""


def check_url(url: str) -> str:
    """``url`` if it is well formed for a webhook (no network access), else ``ValueError`` saying why."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@)")
    if port == 0 or any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError("not a valid URL")
    return url


def refusal(address: IPAddress, allow_private: bool) -> str | None:
    """Why a webhook may not connect to ``address``; ``None`` when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_multicast:
        return "a multicast address"
    if allow_private or address.is_global:
        return None
    for kind in ("loopback", "link_local", "private", "reserved", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    return "not a public address"


def _checked(host: str, infos: list[tuple], allow_private: bool) -> list[IPAddress]:
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not addresses:
        raise TargetRefused(f"host {host!r} has no address")
    for address in addresses:
        reason = refusal(address, allow_private)
        if reason is not None:
            detail = "" if str(address) == host.strip("[]") else f" ({host} resolves to {address})"
            raise TargetRefused(f"{address} is {reason}{detail}; webhooks only reach public addresses")
    return addresses


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def resolve(url: str, allow_private: bool) -> list[IPAddress]:
    """The checked addresses of ``url``'s host (blocking DNS); raises ``TargetRefused``."""
    host, port = _host_port(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise TargetRefused(f"cannot resolve host {host!r}: {exc}") from None
    return _checked(host, infos, allow_private)


async def resolve_async(url: str, allow_private: bool) -> list[IPAddress]:
    """:func:`resolve` on the event loop (the resolver runs in its thread pool)."""
    host, port = _host_port(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise TargetRefused(f"cannot resolve host {host!r}: {exc}") from None
    return _checked(host, infos, allow_private)
