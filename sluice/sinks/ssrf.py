"""The SSRF guard of HTTP destinations (and HTTP handlers): a URL whose host is, or resolves
to, a link-local or cloud-metadata address is refused unless the component allows it
(``allow_link_local: true``). The check runs at validate time for literal addresses and at
connect time, on every resolution, for names (so DNS rebinding cannot slip past it)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2"))


def forbidden(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local or ip in METADATA


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
            raise OSError(f"refused: {host} resolves to a link-local or metadata address "
                          f"({', '.join(bad)}); set allow_link_local: true to allow it")
        return results

    async def close(self) -> None:
        await self._inner.close()


def check_url_config(config: Any) -> list[tuple[tuple[str, ...], str]]:
    """A component ``check`` for configs with ``url`` and ``allow_link_local`` keys."""
    url = str(config.get("url", ""))
    return [(("url",), p) for p in url_problems(url, allow_link_local=bool(
        config.get("allow_link_local")))]
