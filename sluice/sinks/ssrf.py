"""The SSRF guard of HTTP destinations (and HTTP handlers): a URL whose host is, or resolves
to, a link-local or cloud-metadata address is refused unless the component allows it
(``allow_link_local: true``).

1. At validate time, a configured URL with a literal forbidden address is refused.
2. Before every request (a client middleware), a literal address in the request's URL is
   checked: aiohttp connects to an IP literal without asking the resolver.
3. At connect time, on every resolution, a name's addresses are checked (so DNS rebinding
   cannot slip past the guard).
4. Redirects are never followed (the sessions made here are used with
   ``allow_redirects=False``): a 3xx is the destination's answer, and its ``Location`` is not
   visited, so a redirect cannot walk a request past 1-3.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client import DEFAULT_TIMEOUT
from aiohttp.client_middlewares import ClientHandlerType
from aiohttp.resolver import DefaultResolver

METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2"))

# More ranges refused as if they were metadata addresses (none by default). The tests put a
# loopback address here to stand in for a metadata service they cannot reach.
EXTRA_FORBIDDEN: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

REFUSED_HINT = "set allow_link_local: true to allow it"


class RefusedAddress(aiohttp.ClientConnectionError):
    """A request to a link-local or metadata address, refused before connecting."""


def forbidden(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local or ip in METADATA or any(ip in net for net in EXTRA_FORBIDDEN)


def url_problems(url: str, *, allow_link_local: bool) -> list[str]:
    """What is wrong with ``url`` as an HTTP destination (empty: nothing)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return [f"not a valid URL: {exc}"]
    if parts.scheme not in ("http", "https"):
        return [f"expected an http:// or https:// URL, got {url!r}"]
    if not parts.hostname:
        return [f"the URL has no host: {url!r}"]
    if port == 0:
        return ["the URL's port must not be 0"]
    if not allow_link_local and forbidden(parts.hostname):
        return [f"{parts.hostname} is a link-local or metadata address; refused "
                "(set allow_link_local: true to allow it)"]
    return []


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then refuses forbidden addresses."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        bad = [r["host"] for r in results if forbidden(r["host"])]
        if bad:
            # With an errno, aiohttp's connector error shows this text as the reason.
            raise OSError(errno.EACCES, f"refused: {host} resolves to a link-local or metadata "
                                        f"address ({', '.join(bad)}); {REFUSED_HINT}")
        return results

    async def close(self) -> None:
        await self._inner.close()


async def refuse_forbidden_literal(request: aiohttp.ClientRequest,
                                   handler: ClientHandlerType) -> aiohttp.ClientResponse:
    """Client middleware: refuse a request whose URL names a forbidden address literally."""
    host = request.url.host or ""
    if forbidden(host):
        raise RefusedAddress(f"refused: {host} is a link-local or metadata address; "
                             f"{REFUSED_HINT}")
    return await handler(request)


def guarded_session(*, allow_link_local: bool,
                    timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT, limit: int = 100,
                    keepalive_timeout_s: float = 15.0) -> aiohttp.ClientSession:
    """A pooled session with the guard on every request and every resolution (none when
    ``allow_link_local``). Send with ``allow_redirects=False``."""
    connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=keepalive_timeout_s,
                                     resolver=None if allow_link_local else GuardedResolver())
    middlewares = () if allow_link_local else (refuse_forbidden_literal,)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, middlewares=middlewares)


def redirect_refused(url: str, status: int, location: str | None) -> str:
    """The error of a 3xx answer (redirects are not followed)."""
    where = f"redirecting to {location[:500]}" if location else "redirecting (no Location)"
    return (f"{url} answered HTTP {status} {where}; redirects are not followed "
            "(configure the final URL)")
