"""Which URLs a webhook may reach (SSRF protection).

A URL is ``http``/``https`` with a host and no credentials. Its port must be one of ``WEBHOOK_ALLOWED_PORTS``
(80 and 443 by default). Its host is resolved and every address checked: private, loopback, multicast, reserved,
unspecified and shared (carrier-grade NAT) addresses are refused unless ``WEBHOOK_ALLOW_PRIVATE`` is set;
link-local addresses (169.254.0.0/16, fe80::/10) and cloud metadata endpoints always. An IPv6 address that embeds
an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4
``2002::/16``, Teredo) is refused when the IPv4 address would be. The check runs when the job is submitted (the
API answers 422) and again before each delivery attempt, whose connection then goes to the address just checked,
so a name that re-resolves elsewhere (DNS rebinding) cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Collection
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048
# Instance metadata services (AWS/GCP/Azure/OpenStack, AWS ECS and IPv6, Alibaba): never a webhook's target.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"))

# IPv6 prefixes whose packets go to the IPv4 address in their low 32 bits (NAT64, RFC 6052) or in bits 16-48
# (6to4, RFC 3056): such an address is as reachable as that IPv4 address.
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")

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


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, bool] | None:
    """The IPv4 address inside ``address``, and whether packets to ``address`` go to it (IPv4-mapped, NAT64,
    6to4), rather than merely carrying it (IPv4-compatible, Teredo's client); ``None`` when there is none."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped, True
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF), True
    if address.sixtofour is not None:
        return address.sixtofour, True
    if address.teredo is not None:
        return address.teredo[1], False
    if int(address) >> 32 == 0 and int(address) > 1:  # ::a.b.c.d (deprecated), but not :: or ::1
        return ipaddress.IPv4Address(int(address)), False
    return None


def refusal(address: IPAddress, allow_private: bool) -> str | None:
    """Why a webhook may not connect to ``address``; ``None`` when it may."""
    if isinstance(address, ipaddress.IPv6Address) and (embedded := embedded_ipv4(address)) is not None:
        inner, translated = embedded
        reason = refusal(inner, allow_private)
        if reason is not None:
            return f"an IPv6 form of {inner}, {reason}"
        if translated:
            return None
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_link_local:  # 169.254.0.0/16, fe80::/10: metadata services live there, whatever the setting
        return "a link-local address"
    if allow_private or (address.is_global and not address.is_reserved):
        return None
    for kind in ("loopback", "private", "reserved", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return f"a {kind} address"
    return "not a public address"


def port_of(url: str) -> int:
    """The port ``url`` connects to (its scheme's default when it names none)."""
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def check_port(url: str, allowed_ports: Collection[int] | None) -> None:
    """Raises ``TargetRefused`` when ``url``'s port is not one of ``allowed_ports`` (``None``: any port)."""
    if allowed_ports is None:
        return
    port = port_of(url)
    if port not in allowed_ports:
        ports = ", ".join(str(p) for p in sorted(allowed_ports))
        raise TargetRefused(f"port {port} is not allowed; webhooks only reach ports {ports}")


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
    return urlsplit(url).hostname or "", port_of(url)


def resolve(url: str, allow_private: bool, allowed_ports: Collection[int] | None = None) -> list[IPAddress]:
    """The checked addresses of ``url``'s host (blocking DNS), its port checked first against ``allowed_ports``
    (``None``: any); raises ``TargetRefused``."""
    check_port(url, allowed_ports)
    host, port = _host_port(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise TargetRefused(f"cannot resolve host {host!r}") from None
    return _checked(host, infos, allow_private)


async def resolve_async(url: str, allow_private: bool, allowed_ports: Collection[int] | None = None
                        ) -> list[IPAddress]:
    """:func:`resolve` on the event loop (the resolver runs in its thread pool)."""
    check_port(url, allowed_ports)
    host, port = _host_port(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise TargetRefused(f"cannot resolve host {host!r}") from None
    return _checked(host, infos, allow_private)
