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
5. What 1-3 refuse is a :class:`Guard`'s predicate: :data:`LINK_LOCAL` (:func:`forbidden`) for
   every component, or a stricter one, e.g. a restricted pipeline's network policy
   (:meth:`sluice.netpolicy.NetworkPolicy.guard`), which refuses the whole operator network.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
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

ALLOW_LINK_LOCAL = "allow_link_local"  # the key of every component that has the guard
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


@dataclass(frozen=True)
class Guard:
    """What the connect-time guard refuses (rules 2-3): ``refuses`` an IP address (text; a
    name is never refused by it, it is resolved), described as ``what`` in the error, with
    ``hint`` saying how to allow it."""

    refuses: Callable[[str], bool]
    what: str
    hint: str

    def refusal(self, host: str, addresses: list[str] | None = None) -> str:
        """The error text of a refused literal (``addresses`` None) or name."""
        if addresses is None:
            return f"refused: {host} is {self.what}; {self.hint}"
        return (f"refused: {host} resolves to {self.what} ({', '.join(addresses)}); "
                f"{self.hint}")

    async def middleware(self, request: aiohttp.ClientRequest,
                         handler: ClientHandlerType) -> aiohttp.ClientResponse:
        """Client middleware: refuse a request whose URL names a refused address literally
        (rule 2)."""
        host = request.url.host or ""
        if self.refuses(host):
            raise RefusedAddress(self.refusal(host))
        return await handler(request)


LINK_LOCAL = Guard(lambda address: forbidden(address), "a link-local or metadata address",
                   REFUSED_HINT)


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then refuses what ``guard`` refuses (by
    default, link-local and metadata addresses)."""

    def __init__(self, guard: Guard = LINK_LOCAL) -> None:
        self._inner = DefaultResolver()
        self.guard = guard

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        bad = [r["host"] for r in results if self.guard.refuses(r["host"])]
        if bad:
            # With an errno, aiohttp's connector error shows this text as the reason.
            raise OSError(errno.EACCES, self.guard.refusal(host, bad))
        return results

    async def close(self) -> None:
        await self._inner.close()


async def refuse_forbidden_literal(request: aiohttp.ClientRequest,
                                   handler: ClientHandlerType) -> aiohttp.ClientResponse:
    """Client middleware: refuse a request whose URL names a forbidden address literally."""
    return await LINK_LOCAL.middleware(request, handler)


def guarded_session(*, allow_link_local: bool, guard: Guard | None = None,
                    timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT, limit: int = 100,
                    keepalive_timeout_s: float = 15.0) -> aiohttp.ClientSession:
    """A pooled session with a guard on every request and every resolution: ``guard`` when
    given (``allow_link_local`` then changes nothing), else :data:`LINK_LOCAL` unless
    ``allow_link_local``. Send with ``allow_redirects=False``."""
    if guard is None and not allow_link_local:
        guard = LINK_LOCAL
    connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=keepalive_timeout_s,
                                     resolver=None if guard is None else GuardedResolver(guard))
    middlewares = () if guard is None else (guard.middleware,)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, middlewares=middlewares)


def redirect_refused(url: str, status: int, location: str | None) -> str:
    """The error of a 3xx answer (redirects are not followed)."""
    where = f"redirecting to {location[:500]}" if location else "redirecting (no Location)"
    return (f"{url} answered HTTP {status} {where}; redirects are not followed "
            "(configure the final URL)")
