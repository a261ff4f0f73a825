"""The network policy of restricted pipelines (:mod:`sluice.netpolicy`): the address
classifier, and the validate-time refusals of a pipeline put with a tenant's key (literal
addresses, names resolved on this machine, operator code, ``allow_link_local``, a client's raw
settings), each at its key in the text; an allowed range lets them through."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from sluice import registry
from sluice.config.load import parse_pipeline
from sluice.config.model import PipelineConfig
from sluice.errors import ConfigIssue
from sluice.netpolicy import NetworkPolicy, host_of, pipeline_refusals
from sluice.spec import Field, ObjectSpec

NONE = NetworkPolicy()

REFUSED = {
    "127.0.0.1": "loopback", "127.255.0.9": "loopback", "::1": "loopback",
    "10.0.0.1": "private", "172.16.5.4": "private", "192.168.1.1": "private",
    "fd12:3456::1": "private", "100.64.0.1": "shared", "100.127.255.254": "shared",
    "169.254.1.1": "link-local", "fe80::1": "link-local", "fe80::1%eth0": "link-local",
    "169.254.169.254": "metadata", "169.254.170.2": "metadata", "fd00:ec2::254": "metadata",
    "100.100.100.200": "metadata", "0.0.0.0": "unspecified", "::": "unspecified",
    "224.0.0.1": "multicast", "ff02::1": "multicast", "240.0.0.1": "reserved",
    "192.0.2.7": "private", "::ffff:127.0.0.1": "loopback", "::ffff:10.1.2.3": "private",
    "::ffff:169.254.169.254": "metadata", "2002:7f00:1::": "loopback",
    "64:ff9b::a9fe:a9fe": "metadata",
}
GLOBAL = ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::",
          "64:ff9b::808:808", "100.128.0.1")


@pytest.mark.parametrize("address", sorted(REFUSED))
def test_the_operators_network_is_refused(address: str) -> None:
    assert NONE.refuses(address)
    assert REFUSED[address] in (NONE.reason(address) or "")


@pytest.mark.parametrize("address", GLOBAL)
def test_global_addresses_are_not(address: str) -> None:
    assert not NONE.refuses(address)


def test_a_name_is_never_refused_by_the_classifier() -> None:
    assert not NONE.refuses("localhost")  # names are resolved (pipeline_refusals, resolver)


def test_allowed_ranges_let_their_addresses_through() -> None:
    policy = NetworkPolicy.parse(["127.0.0.0/8", "fd00::/8", " 10.1.2.3 "])
    assert not policy.refuses("127.0.0.1")
    assert not policy.refuses("::ffff:127.0.0.5")  # mapped: judged as the IPv4 address
    assert not policy.refuses("fd00:ec2::254")  # allowing a range allows its metadata too
    assert not policy.refuses("10.1.2.3")
    assert policy.refuses("10.1.2.4")
    assert policy.refuses("::1")  # IPv6 loopback is not in 127.0.0.0/8
    assert policy.refuses("169.254.169.254")
    assert [str(n) for n in policy.allowed] == ["127.0.0.0/8", "fd00::/8", "10.1.2.3/32"]


def test_parse_names_the_bad_network() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33' is not a network"):
        NetworkPolicy.parse(["127.0.0.0/8", "10.0.0.0/33"])
    with pytest.raises(ValueError, match="'intranet'"):
        NetworkPolicy.parse(["intranet"])


@pytest.mark.parametrize(("endpoint", "host"), [
    ("http://h.example:8080/x", "h.example"), ("amqp://u:p@[::1]:5672/v", "::1"),
    ("kafka.example:9092", "kafka.example"), ("[fe80::1]:9092", "fe80::1"),
    ("10.0.0.1", "10.0.0.1"), ("::1", "::1"), ("nats://127.0.0.1:4222", "127.0.0.1"),
])
def test_host_of(endpoint: str, host: str) -> None:
    assert host_of(endpoint) == (host, None)


def test_host_of_a_url_without_host() -> None:
    host, problem = host_of("unix:///var/run/redis.sock")
    assert host is None and "names no host" in (problem or "")


def pipeline(*lines: str, handler: str = "{http: {url: 'http://8.8.8.8/fn'}}") -> PipelineConfig:
    text = "\n".join(["name: p", "source: {embedded: {queue: jobs}}", f"handler: {handler}",
                      *lines]) + "\n"
    return parse_pipeline(text, "p.yaml", check_code=False, trusted=False)


def said(issues: list[ConfigIssue]) -> list[str]:
    return [str(i) for i in issues]


async def test_a_global_pipeline_is_not_refused() -> None:
    config = pipeline("on_success: [{http: {url: 'https://1.1.1.1/hook'}}]")
    assert await pipeline_refusals(config, NONE) == []


async def test_literal_addresses_are_refused_at_their_keys() -> None:
    config = pipeline(
        "on_success:",
        "  - http: {url: 'http://127.0.0.1:9/hook'}",
        "  - http: {url: 'http://[::1]:9/hook'}",
        "on_failure: [{http: {url: 'http://10.0.0.1/hook'}}]",
        "dead_letter: {http: {url: 'http://[::ffff:10.0.0.1]/latest'}}",
        handler="{http: {url: 'http://169.254.169.254/{function}', allow_link_local: true}, "
                "batch: {max_size: 2}}",
    )
    issues = await pipeline_refusals(config, NONE)
    reach = ("on the server's own network; a pipeline put with a tenant's key may not reach "
             "it (the server allows no such range)")
    assert said(issues) == [
        f"p.yaml:3:23: handler.http.url: 169.254.169.254 is a cloud metadata address, {reach}",
        "p.yaml:3:78: handler.http.allow_link_local: a pipeline put with a tenant's key may "
        "not allow link-local or metadata addresses",
        f"p.yaml:5:17: on_success[0].http.url: 127.0.0.1 is a loopback address, {reach}",
        f"p.yaml:6:17: on_success[1].http.url: ::1 is a loopback address, {reach}",
        f"p.yaml:7:27: on_failure[0].http.url: 10.0.0.1 is a private address, {reach}",
        "p.yaml:8:27: dead_letter.http.url: ::ffff:10.0.0.1 is a private address (10.0.0.1), "
        f"{reach}",
    ]
    assert (issues[0].path, issues[0].line, issues[0].col) == ("handler.http.url", 3, 23)


async def test_an_allowed_range_lets_them_through() -> None:
    config = pipeline("on_success:",
                      "  - http: {url: 'http://127.0.0.1:9/hook'}",
                      "  - http: {url: 'http://[::1]:9/hook'}",
                      "  - http: {url: 'http://localhost:9/hook'}",
                      "  - http: {url: 'http://10.0.0.1/hook'}")
    policy = NetworkPolicy.parse(["127.0.0.0/8", "::1/128", "10.0.0.0/8"])
    assert await pipeline_refusals(config, policy) == []
    narrower = NetworkPolicy.parse(["127.0.0.0/8", "::1/128"])
    (issue,) = await pipeline_refusals(config, narrower)
    assert issue.path == "on_success[3].http.url"
    assert "(the server allows 127.0.0.0/8, ::1/128 only)" in issue.message


async def test_a_name_that_resolves_to_loopback_is_refused() -> None:
    config = pipeline("on_success: [{http: {url: 'http://localhost:9/hook'}}]",
                      handler="{http: {url: 'http://127.1:9/fn'}}")
    issues = await pipeline_refusals(config, NONE)
    assert [i.path for i in issues] == ["handler.http.url", "on_success[0].http.url"]
    assert issues[0].message.startswith("127.1 resolves to 127.0.0.1, a loopback address")
    assert issues[1].message.startswith("localhost resolves to ")
    assert "a loopback address, on the server's own network" in issues[1].message


async def test_the_machines_own_name_is_judged_by_what_it_resolves_to() -> None:
    name = socket.gethostname()
    addresses = {str(i[4][0]) for i in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)}
    config = pipeline(f"on_success: [{{http: {{url: 'http://{name}:9/hook'}}}}]")
    issues = await pipeline_refusals(config, NONE)
    if any(NONE.refuses(a) for a in addresses):  # this machine's name is on its own network
        (issue,) = issues
        assert issue.message.startswith(f"{name} resolves to ")
    else:
        assert issues == []
    allowing = NetworkPolicy.parse([f"{a}/{32 if ':' not in a else 128}" for a in addresses])
    assert await pipeline_refusals(config, allowing) == []


async def test_a_name_that_does_not_resolve_is_refused() -> None:
    config = pipeline("on_success: [{http: {url: 'http://no-such-host.invalid/hook'}}]")
    (issue,) = await pipeline_refusals(config, NONE, timeout_s=5)
    assert issue.path == "on_success[0].http.url"
    assert issue.message.startswith("no-such-host.invalid ")
    assert "a name that cannot be resolved cannot be checked" in issue.message


async def test_operator_code_and_allow_link_local_are_refused() -> None:
    config = pipeline("on_success: [{http: {url: 'http://1.1.1.1/', allow_link_local: true}}]",
                      handler="{python: tests.helpers.handlers:behave}")
    issues = await pipeline_refusals(config, NetworkPolicy.parse(["0.0.0.0/0", "::/0"]))
    assert said(issues) == [
        "p.yaml:3:19: handler.python: a handler of type 'python' runs the operator's code on "
        "the server; a pipeline put with a tenant's key may not use it",
        "p.yaml:4:64: on_success[0].http.allow_link_local: a pipeline put with a tenant's key "
        "may not allow link-local or metadata addresses",
    ]


async def test_broker_addresses_are_checked_through_their_specs() -> None:
    text = "\n".join([
        "name: p",
        "source: {kafka: {brokers: '8.8.8.8:9092, 127.0.0.1:9092', topic: t,",
        "                 config: {security.protocol: SSL, plugin.library.paths: /tmp/x.so}}}",
        "handler: {http: {url: 'http://8.8.8.8/fn'}}",
        "on_success:",
        "  - nats: {stream: S, url: 'nats://1.1.1.1:4222, nats://[::1]:4222'}",
        "  - redis: {stream: s, url: 'unix:///var/run/redis.sock'}",
        "  - rabbitmq: {queue: q, url: 'amqp://u:p@192.168.0.1/'}",
        "  - mqtt: {topic: t, url: 'mqtt://100.64.0.1'}",
    ]) + "\n"
    issues = await pipeline_refusals(parse_pipeline(text, "p.yaml", trusted=False), NONE)
    assert sorted((i.path, i.message.split(",")[0].split(";")[0]) for i in issues) == [
        ("on_success[0].nats.url", "::1 is a loopback address"),
        ("on_success[1].redis.url", "the URL names no host (a local socket?)"),
        ("on_success[2].rabbitmq.url", "192.168.0.1 is a private address"),
        ("on_success[3].mqtt.url", "100.64.0.1 is a shared (CGNAT) address"),
        ("source.kafka.brokers", "127.0.0.1 is a loopback address"),
        ("source.kafka.config.plugin.library.paths",
         "a pipeline put with a tenant's key may not set the librdkafka property "
         "'plugin.library.paths' (allowed: acks"),
    ]


async def test_a_third_party_component_is_checked_by_its_url_key() -> None:
    reg = registry.Registry(modules=registry.BUILTIN_MODULES, entry_point_group=None)
    reg.load()

    def factory(config: Any, ctx: registry.BuildContext) -> object:
        raise AssertionError("not built")

    reg.register(registry.ComponentSpec(
        family="sink", name="acme", summary="A third party's sink.",
        config=ObjectSpec(Field("url", "string", "Where.", default=None),
                          Field("label", "string", "Its label.", default=None)),
        factory=factory))
    with registry.using(reg):
        config = pipeline("on_success: [{acme: {url: 'tcp://10.9.8.7:1'}}, {acme: {label: b}}]")
        (issue,) = await pipeline_refusals(config, NONE)
    assert issue.path == "on_success[0].acme.url"
    assert issue.message.startswith("10.9.8.7 is a private address")


async def test_a_webhook_signing_with_a_server_secret_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    config = pipeline("on_success: [{webhook: {url: 'https://1.1.1.1/h', "
                      "secret_env: HOOK_SECRET}}]")
    (issue,) = await pipeline_refusals(config, NONE)
    assert issue.path == "on_success[0].webhook.secret_env"
    assert "cannot use the server's environment variables" in issue.message
