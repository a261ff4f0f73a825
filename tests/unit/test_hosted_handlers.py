"""Handlers of a hosting pipeline (``tenancy:``): a message's tenant and function; a Python
target that is a mapping of function names to callables (each message to its function, sync or
async, an unknown name failing at once); an HTTP URL with ``{function}``/``{tenant}`` in its
path, against a real aiohttp server on 127.0.0.1 (the filled URL, the CloudEvent extensions,
a batch split by URL), and a bad placeholder refused at load with its file:line:col."""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sluice import registry, runtime
from sluice.config.load import parse_pipeline
from sluice.errors import ConfigError, Reject
from sluice.handlers.http import HttpHandler, template_problems
from sluice.handlers.python import (
    Functions,
    PythonHandler,
    build_handler,
    check_import,
    import_target,
)
from sluice.message import Message

HERE = "tests.unit.test_hosted_handlers"


# -- the functions a mapping target names ----------------------------------------------------

def resize(m: Message) -> dict[str, Any]:
    return {"fn": "resize", "thread": threading.current_thread().name, "got": m.payload}


async def thumb(m: Message) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"fn": "thumb", "tenant": m.tenant}


def fallback(m: Message) -> str:
    return "default"


def sync_slow(m: Message) -> None:
    threading.Event().wait(1.0)


async def async_slow(m: Message) -> None:
    await asyncio.sleep(5)


FUNCTIONS = {"resize": resize, "thumb": thumb, "default": fallback,
             "sync-slow": sync_slow, "async-slow": async_slow}
MANY = {f"fn{i:02d}": fallback for i in range(12)}
NOT_CALLABLE = {"resize": resize, "broken": 42}
EMPTY: dict[str, Any] = {}


def msg(function: str | None = None, tenant: str | None = None, payload: Any = None,
        task_id: str = "t1") -> Message:
    return Message(task_id, "hosted", payload, json.dumps(payload).encode(), tenant=tenant,
                   function=function)


# -- Message ---------------------------------------------------------------------------------

def test_a_message_carries_its_tenant_and_function() -> None:
    plain = Message("t1", "p", body=b"{}")
    assert (plain.tenant, plain.function) == (None, None)
    hosted = Message("t1", "p", body=b"{}", attempt=2, tenant="acme", function="resize")
    assert (hosted.tenant, hosted.function, hosted.attempt) == ("acme", "resize", 2)
    assert hosted == Message("t1", "p", body=b"{}", attempt=2, tenant="acme", function="resize")
    assert hosted != Message("t1", "p", body=b"{}", attempt=2, tenant="acme", function="thumb")
    assert hosted != Message("t1", "p", body=b"{}", attempt=2, tenant="other",
                             function="resize")
    assert "tenant='acme', function='resize'" in repr(hosted)
    assert "tenant" not in repr(plain)


# -- Python: a mapping of functions ----------------------------------------------------------

async def test_each_message_runs_its_function_sync_or_async() -> None:
    table = import_target(f"{HERE}:FUNCTIONS")
    assert isinstance(table, Functions)
    assert sorted(table) == sorted(FUNCTIONS)
    assert table(msg(None)) == "default"  # calling the table calls the message's function
    with pytest.raises(Reject, match="no function 'nope'"):
        table(msg("nope"))
    handler = PythonHandler(table)
    try:
        sync = await handler.invoke(msg("resize", "acme", {"w": 10}), 5)
        assert sync.status == "success" and sync.result is not None
        got = json.loads(sync.result)
        assert got["fn"] == "resize" and got["got"] == {"w": 10}
        assert got["thread"].startswith("sluice-handler")  # a sync one: in the thread pool
        async_ = await handler.invoke(msg("thumb", "acme"), 5)
        assert async_.result is not None
        assert json.loads(async_.result) == {"fn": "thumb", "tenant": "acme"}
        default = await handler.invoke(msg(None), 5)  # no function: "default"
        assert default.status == "success" and default.result == b'"default"'
    finally:
        await handler.close()


async def test_the_timeout_holds_for_sync_and_async_functions_of_a_mapping() -> None:
    handler = PythonHandler(import_target(f"{HERE}:FUNCTIONS"))
    try:
        for name in ("sync-slow", "async-slow"):
            out = await handler.invoke(msg(name), 0.1)
            assert (out.status, out.error_type, out.overload) == ("retry", "Timeout", True), name
    finally:
        await handler.close()


async def test_an_unknown_function_fails_at_once_naming_it_and_some_known_ones() -> None:
    handler = PythonHandler(import_target(f"{HERE}:FUNCTIONS"))
    out = await handler.invoke(msg("nope"), 5)
    assert (out.status, out.error_type) == ("failure", "UnknownFunction")
    assert out.error_message is not None
    assert "'nope'" in out.error_message
    assert "resize" in out.error_message and "thumb" in out.error_message
    await handler.close()
    many = PythonHandler(import_target(f"{HERE}:MANY"))
    out = await many.invoke(msg("fn99"), 5)
    assert out.error_message is not None
    assert "fn09" in out.error_message and "fn10" not in out.error_message  # ten shown
    assert "(2 more)" in out.error_message
    await many.close()


async def test_a_mapping_called_with_a_batch_runs_each_message_alone() -> None:
    handler = PythonHandler(import_target(f"{HERE}:FUNCTIONS"))
    outs = await handler.invoke_batch([msg("thumb", "a"), msg("nope"), msg(None)], 5)
    assert [o.status for o in outs] == ["success", "failure", "success"]
    assert outs[1].error_type == "UnknownFunction"
    await handler.close()


def test_a_value_that_is_not_callable_is_refused_at_import_naming_its_key() -> None:
    with pytest.raises(ImportError, match="'broken' is not callable"):
        import_target(f"{HERE}:NOT_CALLABLE")
    ((path, problem),) = check_import(f"{HERE}:NOT_CALLABLE", None)
    assert path == () and "'broken'" in problem
    with pytest.raises(ImportError, match="empty mapping"):
        import_target(f"{HERE}:EMPTY")
    assert check_import(f"{HERE}:FUNCTIONS", None) == []


def test_a_not_callable_value_is_an_error_at_the_handler_line() -> None:
    text = textwrap.dedent(f"""\
        name: hosted
        source:
          embedded: {{queue: hosted}}
        handler:
          python: {HERE}:NOT_CALLABLE
        """)
    with pytest.raises(ConfigError) as info:
        parse_pipeline(text, "p.yaml")
    (issue,) = info.value.issues
    assert str(issue).startswith("p.yaml:5:11: handler.python: ")
    assert "'broken' is not callable" in str(issue)


def test_a_mapping_with_handler_batch_is_refused_when_built() -> None:
    config = registry.handler("python").typed(f"{HERE}:FUNCTIONS")
    with pytest.raises(ImportError, match=r"takes no batch: remove handler\.batch"):
        build_handler(config, registry.BuildContext(pipeline="hosted", batch=True))
    built = build_handler(config, registry.BuildContext(pipeline="hosted"))
    assert isinstance(built.fn, Functions)


def test_a_one_function_pipeline_with_a_mapping_and_a_batch_is_refused_at_its_line(
        tmp_path: Path) -> None:
    config = parse_pipeline(textwrap.dedent(f"""\
        name: mapped
        source: {{embedded: {{queue: mapped}}}}
        handler:
          python: {HERE}:FUNCTIONS
          batch: {{max_size: 10}}
        """), str(tmp_path / "mapped.yaml"))
    loop = runtime.build(config, tmp_path)
    with pytest.raises(ConfigError) as caught:
        runtime.build_handlers([loop])
    (issue,) = caught.value.issues
    assert issue.line == 4 and "takes no batch: remove handler.batch" in issue.message


# -- HTTP: a URL template --------------------------------------------------------------------

@dataclass
class Seen:
    """What the server saw: each request's raw path, headers and body."""

    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.paths.append(request.raw_path)
        self.headers.append(dict(request.headers))
        self.bodies.append(body)
        if request.match_info.get("function") == "missing":
            return web.Response(status=404, text="no such function")
        if request.content_type == "application/cloudevents-batch+json":
            return web.json_response([{"id": e["id"], "status": 200,
                                       "body": {"path": request.raw_path}}
                                      for e in json.loads(body)])
        return web.json_response({"path": request.raw_path})


@pytest.fixture
async def server() -> AsyncIterator[tuple[Seen, str]]:
    seen = Seen()
    app = web.Application()
    app.router.add_post("/t/{tenant}/{function}", seen.handle)
    app.router.add_post("/fn/{function}", seen.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield seen, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_each_call_goes_to_the_url_of_its_function_and_tenant(
        server: tuple[Seen, str]) -> None:
    seen, base = server
    handler = HttpHandler(base + "/t/{tenant}/{function}")
    try:
        out = await handler.invoke(msg("resize", "acme", {"a": 1}), 5)
        assert out.status == "success" and out.result is not None
        assert json.loads(out.result) == {"path": "/t/acme/resize"}
        out = await handler.invoke(msg(None, None), 5)  # neither: "default" for both
        assert out.result is not None
        assert json.loads(out.result) == {"path": "/t/default/default"}
        out = await handler.invoke(msg("a b/c", "acme"), 5)  # one path segment, encoded
        assert out.result is not None
        assert json.loads(out.result) == {"path": "/t/acme/a%20b%2Fc"}
        assert seen.paths == ["/t/acme/resize", "/t/default/default", "/t/acme/a%20b%2Fc"]
    finally:
        await handler.close()


async def test_binary_events_carry_the_tenant_and_function_extensions(
        server: tuple[Seen, str]) -> None:
    seen, base = server
    handler = HttpHandler(base + "/fn/{function}", mode="binary")
    try:
        await handler.invoke(msg("thumb", "acme", {"x": 1}), 5)
        await handler.invoke(msg(None, None), 5)
    finally:
        await handler.close()
    hosted, plain = ({k.lower(): v for k, v in h.items()} for h in seen.headers)
    assert hosted["ce-sluicetenant"] == "acme"
    assert hosted["ce-sluicefunction"] == "thumb"
    assert hosted["ce-id"] == "t1"
    assert seen.bodies[0] == b'{"x": 1}'
    assert "ce-sluicetenant" not in plain and "ce-sluicefunction" not in plain


async def test_structured_events_carry_the_extensions_too(server: tuple[Seen, str]) -> None:
    seen, base = server
    handler = HttpHandler(base + "/fn/{function}", mode="structured")
    try:
        await handler.invoke(msg("thumb", "acme", {"x": 1}), 5)
    finally:
        await handler.close()
    event = json.loads(seen.bodies[0])
    assert (event["sluicetenant"], event["sluicefunction"]) == ("acme", "thumb")


async def test_errors_name_the_url_that_was_called(server: tuple[Seen, str]) -> None:
    _, base = server
    handler = HttpHandler(base + "/t/{tenant}/{function}")
    try:
        out = await handler.invoke(msg("missing", "acme"), 5)
        assert (out.status, out.error_type) == ("failure", "HTTP404")
        assert out.error_message is not None
        assert out.error_message.startswith(f"{base}/t/acme/missing answered HTTP 404")
        out = await handler.invoke(msg("..", "acme"), 5)  # would leave the path: refused
        assert (out.status, out.error_type) == ("failure", "InvalidName")
    finally:
        await handler.close()
    unreachable = HttpHandler("http://127.0.0.1:9/x/{function}")
    try:
        out = await unreachable.invoke(msg("resize"), 5)
        assert (out.status, out.error_type) == ("retry", "ConnectionError")
        assert out.error_message is not None
        assert out.error_message.startswith("http://127.0.0.1:9/x/resize: ")
    finally:
        await unreachable.close()


async def test_a_batch_makes_one_call_per_url_and_keeps_the_order(
        server: tuple[Seen, str]) -> None:
    seen, base = server
    handler = HttpHandler(base + "/fn/{function}")
    names = ["resize", "thumb", "resize", None, "thumb", ".."]
    messages = [msg(n, "acme", {"i": i}, task_id=f"t{i}") for i, n in enumerate(names)]
    try:
        outs = await handler.invoke_batch(messages, 5)
    finally:
        await handler.close()
    assert sorted(seen.paths) == ["/fn/default", "/fn/resize", "/fn/thumb"]
    for path, body in zip(seen.paths, seen.bodies, strict=True):
        ids = [e["id"] for e in json.loads(body)]
        expected = [f"t{i}" for i, n in enumerate(names) if f"/fn/{n or 'default'}" == path]
        assert ids == expected
    assert [o.status for o in outs] == ["success"] * 5 + ["failure"]
    assert [json.loads(o.result)["path"] for o in outs[:5] if o.result is not None] == [
        "/fn/resize", "/fn/thumb", "/fn/resize", "/fn/default", "/fn/thumb"]
    assert outs[5].error_type == "InvalidName"


def test_a_url_without_placeholders_is_used_as_it_is() -> None:
    handler = HttpHandler("http://127.0.0.1:8080/fn")
    assert not handler.templated
    assert handler.url_for(msg("resize", "acme")) == "http://127.0.0.1:8080/fn"
    assert handler._urls == {}


def test_placeholders_only_known_ones_and_only_in_the_path() -> None:
    assert template_problems("http://fns.internal/{function}") == []
    assert template_problems("http://127.0.0.1:8080/t/{tenant}/{function}?x=1") == []
    assert "unknown placeholder {nope}" in template_problems("http://h/{nope}")[0]
    assert "only in the URL's path" in template_problems("http://{tenant}.fns/x")[0]
    assert "only in the URL's path" in template_problems("http://h/x?fn={function}")[0]
    assert "unmatched" in template_problems("http://h/{function")[0]
    with pytest.raises(ValueError, match="unknown placeholder"):
        HttpHandler("http://h/{nope}")


def _pipeline(url: str) -> str:
    return textwrap.dedent(f"""\
        name: hosted
        source:
          embedded: {{queue: hosted}}
        handler:
          http:
            url: "{url}"
        """)


def test_a_bad_placeholder_is_refused_at_load_with_its_place() -> None:
    with pytest.raises(ConfigError) as info:
        parse_pipeline(_pipeline("http://127.0.0.1:8080/{nope}"), "p.yaml")
    (issue,) = info.value.issues
    assert str(issue).startswith("p.yaml:6:10: handler.http.url: unknown placeholder {nope}")
    with pytest.raises(ConfigError) as info:
        parse_pipeline(_pipeline("http://{tenant}.fns.internal/x"), "p.yaml")
    assert "only in the URL's path" in str(info.value)
    config = parse_pipeline(_pipeline("http://127.0.0.1:8080/t/{tenant}/{function}"), "p.yaml")
    assert config.handler.config["url"] == "http://127.0.0.1:8080/t/{tenant}/{function}"
    with pytest.raises(ConfigError, match="link-local"):  # the filled URL's checks still hold
        parse_pipeline(_pipeline("http://169.254.169.254/{function}"), "p.yaml")
