"""The network policy of restricted pipelines: a pipeline put with a tenant's key
(:mod:`sluice.definitions`, invariant 3) may not reach the operator's own network.

Rules:

1. Refused addresses (:meth:`NetworkPolicy.refuses`): loopback, private (RFC 1918, ULA
   ``fc00::/7``), shared (CGNAT ``100.64.0.0/10``), link-local, the cloud metadata addresses of
   :mod:`sluice.sinks.ssrf`, unspecified (``0.0.0.0``, ``::``), multicast, reserved, and every
   other range that is not globally reachable. An IPv4 address inside IPv6 (IPv4-mapped
   ``::ffff:a.b.c.d``, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``) is
   judged as that IPv4 address (a NAT64 network's public addresses stay reachable). An
   address inside one of the policy's ``allowed`` networks (``sluice serve --allow-network
   CIDR``) is not refused.
2. At validate time (:func:`pipeline_refusals`), every address the pipeline's components will
   connect to — its source (a broker), its handler, each result destination and its dead
   letter, as each component's spec says (:attr:`sluice.registry.ComponentSpec.endpoints`) —
   is refused when its host is a refused literal, when the name resolves to any refused
   address, or when it does not resolve within :data:`RESOLVE_TIMEOUT_S` (it cannot be
   checked). A URL without a host (a local socket) is refused.
3. Also refused at validate time: a component that runs the operator's code on the worker
   (``runs_operator_code``: a Python handler), ``allow_link_local: true`` anywhere, and what a
   component's ``restricted_check`` refuses (e.g. a client's raw settings that name local
   files or libraries).
4. At connect time, the HTTP handler and the http and webhook sinks of a restricted pipeline
   (built with :attr:`sluice.registry.BuildContext.network`) check every resolution and every
   literal host with :meth:`NetworkPolicy.guard`, and follow no redirect (:mod:`sluice.sinks.
   ssrf`): a name that resolves elsewhere after validation (DNS rebinding) is refused before
   any connection.
5. This module names no component type: it asks the registry (rule 2).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sluice import registry
from sluice.errors import ConfigIssue
from sluice.sinks import ssrf

if TYPE_CHECKING:
    from sluice.config.model import ComponentConfig, PipelineConfig
    from sluice.config.yamlmarks import PathKey

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RESOLVE_TIMEOUT_S = 2.0  # a name's resolution at validate time (rule 2)
ALLOW_FLAG = "sluice serve --allow-network CIDR"

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
_6TO4 = ipaddress.IPv6Network("2002::/16")
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv6 one (mapped, 6to4, NAT64), if any (rule 1)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _6TO4:
        return ip.sixtofour
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def kind(ip: IPAddress) -> str | None:
    """What makes ``ip`` an address of the operator's network (rule 1), or ``None`` (a
    globally reachable address). Judged on ``ip`` alone (no unwrapping)."""
    if ip in ssrf.METADATA or any(ip in net for net in ssrf.EXTRA_FORBIDDEN):
        return "a cloud metadata address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "a shared (CGNAT) address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "an address that is not globally reachable"
    return None


def _parse_ip(address: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class NetworkPolicy:
    """What a restricted pipeline may not reach (rule 1): the operator's network, except the
    ``allowed`` networks."""

    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, cidrs: Sequence[str]) -> NetworkPolicy:
        """The policy allowing ``cidrs`` (``10.0.0.0/8``, ``fd00::/8``, ``127.0.0.1``: one
        address); ``ValueError`` naming the first that is not a network."""
        allowed: list[IPNetwork] = []
        for cidr in cidrs:
            try:
                allowed.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a network (CIDR, e.g. 10.0.0.0/8): "
                                 f"{exc}") from None
        return cls(tuple(allowed))

    def is_allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allowed)

    def reason(self, address: str) -> str | None:
        """Why ``address`` (an IP address, as text) is refused (rule 1), or ``None``: allowed,
        globally reachable, or not an IP address (a name is resolved, never refused here)."""
        ip = _parse_ip(address)
        if ip is None:
            return None
        inner = _embedded_ipv4(ip)
        judged: IPAddress = ip if inner is None else inner  # it reaches that IPv4 address
        why = kind(judged)
        if why is None or self.is_allowed(judged) or self.is_allowed(ip):
            return None
        return why if judged == ip else f"{why} ({judged})"

    def refuses(self, address: str) -> bool:
        """Whether ``address`` (an IP address as text) is refused (rule 1); a name is not."""
        return self.reason(address) is not None

    def described(self) -> str:
        """The allowed networks, for messages."""
        if not self.allowed:
            return "the server allows no such range"
        return "the server allows " + ", ".join(str(n) for n in self.allowed) + " only"

    def guard(self) -> ssrf.Guard:
        """The connect-time guard of a restricted pipeline's HTTP components (rule 4)."""
        return ssrf.Guard(self.refuses, "an address of the server's own network (loopback, "
                          "private, link-local or metadata)",
                          f"a pipeline put with a tenant's key may not reach it "
                          f"({self.described()}; {ALLOW_FLAG})")


# -- validate time (rules 2, 3) ----------------------------------------------------------------

def host_of(endpoint: str) -> tuple[str | None, str | None]:
    """(host, problem) of a URL or ``host[:port]`` (``[v6]:port``, a bare IPv6 literal)."""
    text = endpoint.strip()
    if "://" in text:
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - a bad port is a bad URL
        except ValueError as exc:
            return None, f"not a valid URL: {exc}"
        if not parts.hostname:
            return None, ("the URL names no host (a local socket?); a pipeline put with a "
                          "tenant's key must name a host")
        return parts.hostname, None
    if text.startswith("["):
        end = text.find("]")
        return (text[1:end], None) if end > 1 else (None, f"not a valid address: {text!r}")
    if text.count(":") > 1:
        return text, None  # a bare IPv6 literal
    host = text.split(":", 1)[0]
    return (host, None) if host else (None, f"names no host: {text!r}")


async def _resolve(host: str, timeout_s: float) -> tuple[list[str], str | None]:
    """(addresses, problem) of a name (rule 2)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout_s)
    except TimeoutError:
        return [], f"did not resolve within {timeout_s:g}s"
    except (OSError, ValueError) as exc:  # UnicodeError: a name IDNA cannot encode
        return [], f"does not resolve ({exc})"
    return sorted({str(info[4][0]) for info in infos}), None


async def host_refusal(host: str, policy: NetworkPolicy,
                       timeout_s: float = RESOLVE_TIMEOUT_S) -> str | None:
    """Why a pipeline put with a tenant's key may not connect to ``host`` (rule 2), or
    ``None``."""
    suffix = f"; a pipeline put with a tenant's key may not reach it ({policy.described()})"
    if _parse_ip(host) is not None:
        why = policy.reason(host)
        return None if why is None else f"{host} is {why}, on the server's own network{suffix}"
    addresses, problem = await _resolve(host, timeout_s)
    if problem is not None:
        return (f"{host} {problem}: a name that cannot be resolved cannot be checked, so it "
                "is refused in a pipeline put with a tenant's key")
    for address in addresses:
        why = policy.reason(address)
        if why is not None:
            return (f"{host} resolves to {address}, {why}, on the server's own "
                    f"network{suffix}")
    return None


def _components(config: PipelineConfig) -> list[tuple[str, PathKey, ComponentConfig]]:
    """(family, path of its config in the document, component) of every component."""
    found: list[tuple[str, PathKey, ComponentConfig]] = [
        ("source", ("source", config.source.type), config.source),
        ("handler", ("handler", config.handler.type), config.handler),
        ("sink", ("dead_letter", config.dead_letter.type), config.dead_letter)]
    for slot, entries in (("on_success", config.on_success),
                          ("on_failure", config.on_failure)):
        found.extend(("sink", (slot, i, c.type), c) for i, c in enumerate(entries))
    return found


def _allows_link_local(config: Any) -> bool:
    if isinstance(config, Mapping):
        return config.get(ssrf.ALLOW_LINK_LOCAL) is True
    return getattr(config, ssrf.ALLOW_LINK_LOCAL, False) is True


async def pipeline_refusals(config: PipelineConfig, policy: NetworkPolicy, *,
                            timeout_s: float = RESOLVE_TIMEOUT_S) -> list[ConfigIssue]:
    """Every reason ``config``, put with a tenant's key, may not run under ``policy`` (rules
    2, 3), each at its key in the pipeline's text. Empty: it may."""
    issues: list[ConfigIssue] = []
    checked: list[tuple[PathKey, str]] = []  # (path, host) to check
    for family, path, component in _components(config):
        spec = registry.get(family, component.type)
        if spec.runs_operator_code:
            issues.append(config.issue(path, f"a {family} of type {component.type!r} runs the "
                                       "operator's code on the server; a pipeline put with a "
                                       "tenant's key may not use it"))
            continue
        if _allows_link_local(component.config):
            issues.append(config.issue((*path, ssrf.ALLOW_LINK_LOCAL),
                                       "a pipeline put with a tenant's key may not allow "
                                       "link-local or metadata addresses"))
        typed = spec.typed(component.config)
        if spec.restricted_check is not None:
            issues.extend(config.issue((*path, *key), message)
                          for key, message in spec.restricted_check(typed))
        for key, endpoint in spec.endpoints(typed):
            host, problem = host_of(endpoint)
            if problem is not None:
                issues.append(config.issue((*path, *key), problem))
            elif host is not None:
                checked.append(((*path, *key), host))
    hosts = sorted({host for _, host in checked})
    refusals = dict(zip(hosts, await asyncio.gather(
        *(host_refusal(h, policy, timeout_s) for h in hosts)), strict=True))
    for path, host in checked:
        why = refusals[host]
        if why is not None:
            issues.append(config.issue(path, why))
    return sorted(issues, key=lambda i: (i.line, i.col))
