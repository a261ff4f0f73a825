"""Sink: a signed webhook per the Standard Webhooks spec (``webhook: {url, secret_env}``),
signed with the ``standardwebhooks`` library: ``webhook-id`` is the task id (the same on every
retry, so a receiver can drop repeats), ``webhook-timestamp`` the time of the attempt, and
``webhook-signature`` the HMAC-SHA256 of ``id.timestamp.body`` under the secret. The secret
(``whsec_`` + base64, as the spec's libraries make them) is read from the environment variable
named by ``secret_env``, never from the file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook

from sluice import registry
from sluice.config.destinations import label_field
from sluice.connectors.base import SinkRecord
from sluice.sinks.http import (
    DELIVERY_FIELDS,
    URL,
    URL_FIELDS,
    HttpSink,
    HttpSinkConfig,
    network_guard,
    url_check,
)
from sluice.sinks.ssrf import Guard
from sluice.spec import REQUIRED, Field, ObjectSpec

SECRET_ENV = "secret_env"

CONFIG = ObjectSpec(
    *URL_FIELDS,
    Field(SECRET_ENV, "string", "Name of the environment variable holding the signing "
          "secret (whsec_...).", default=REQUIRED, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"),
    label_field(URL),
    *DELIVERY_FIELDS,
)


@dataclass(frozen=True, slots=True)
class WebhookSinkConfig(HttpSinkConfig):
    """The typed ``webhook`` sink config (the keys of :data:`CONFIG`): the ``http`` sink's,
    and ``secret_env``."""

    secret_env: str


class WebhookSink(HttpSink):
    def __init__(self, url: str, secret: str, headers: dict[str, str] | None = None, *,
                 timeout_s: float = 10.0, allow_link_local: bool = False,
                 guard: Guard | None = None) -> None:
        super().__init__(url, headers, timeout_s=timeout_s, allow_link_local=allow_link_local,
                         guard=guard)
        self._signer = Webhook(secret)

    def request_headers(self, record: SinkRecord) -> dict[str, str]:
        now = datetime.now(UTC)
        signature = self._signer.sign(record.task_id, now, record.body.decode())
        return {**super().request_headers(record), "webhook-id": record.task_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": signature}


def check(config: Any, file: object) -> list[tuple[tuple[str, ...], str]]:
    typed = WebhookSinkConfig.from_mapping(config)
    problems = url_check(typed.url, typed.allow_link_local)
    name = typed.secret_env
    if name and not os.environ.get(name):
        problems.append(((SECRET_ENV,), f"environment variable {name!r} is not set "
                                        "(it holds the webhook signing secret)"))
    return problems


def restricted_check(config: WebhookSinkConfig) -> list[tuple[tuple[str, ...], str]]:
    """A restricted pipeline (a tenant's) may not sign with a secret of the server's
    environment: it would choose which of the server's secrets signs what it sends."""
    return [((SECRET_ENV,), "a pipeline put with a tenant's key cannot use the server's "
             "environment variables; a tenant's pipeline cannot use the webhook sink (use an "
             "http destination with its own headers)")]


def build_sink(config: WebhookSinkConfig, ctx: registry.BuildContext) -> WebhookSink:
    return WebhookSink(config.url, os.environ[config.secret_env], config.headers,
                       timeout_s=float(config.timeout_s),
                       allow_link_local=config.allow_link_local, guard=network_guard(ctx))


registry.register(registry.ComponentSpec(
    family="sink",
    name="webhook",
    summary="A signed webhook (Standard Webhooks: webhook-id, -timestamp, -signature).",
    config=CONFIG,
    factory=build_sink,
    settings=WebhookSinkConfig.from_mapping,
    check=check,
    restricted_check=restricted_check,
))
