"""``sluice test``: a pipeline's handler over the cases of its tests file, with no broker
(sluice/pipeline_tests.py, sluice/pipeline_tests_file.py)."""

from __future__ import annotations

import json
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from sluice.cli import cli
from sluice.config.load import load_pipeline
from sluice.errors import ConfigError
from sluice.pipeline_tests import run_cases
from sluice.pipeline_tests_file import CASE_SPEC, default_tests_file, load_cases
from tests.conftest import ROOT

PIPELINES = ROOT / "pipelines"
QUICKSTART = PIPELINES / "quickstart.yaml"
SHOP = PIPELINES / "shop.yaml"


def sluice_test(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["test", *map(str, args)])


def write_tests(tmp_path: Path, text: str, name: str = "cases.tests.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def json_of(result: Result) -> dict[str, object]:
    parsed = json.loads(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


def cases_of(result: Result) -> dict[str, dict[str, object]]:
    cases = json_of(result)["cases"]
    assert isinstance(cases, list)
    return {c["name"]: c for c in cases}


def own_pipeline(tmp_path: Path, handler_code: str, consumer: str = "") -> Path:
    """A pipeline in ``tmp_path`` whose handler is ``handle`` of a module of its own."""
    module = f"handler_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(handler_code), encoding="utf-8")
    pipeline = tmp_path / "own.yaml"
    pipeline.write_text(f"name: own\nsource:\n  embedded: {{queue: own}}\nhandler:\n"
                        f"  python: {module}:handle\n{consumer}", encoding="utf-8")
    return pipeline


@pytest.mark.parametrize("tests", sorted(PIPELINES.glob("*.tests.yaml")), ids=lambda p: p.name)
def test_every_shipped_tests_file_passes(tests: Path) -> None:
    result = sluice_test(tests.with_name(tests.name.replace(".tests.yaml", ".yaml")), "--json")
    assert result.exit_code == 0, result.output
    report = json_of(result)
    assert report["failed"] == 0 and isinstance(report["passed"], int) and report["passed"] >= 3
    expected = [c["expected"] for c in cases_of(result).values()]
    assert any(not str(e).startswith("result") for e in expected), "no non-success case"


def test_the_examples_with_python_handlers_have_tests_files() -> None:
    for name in ("quickstart", "batching", "chain_orders", "chain_receipts", "kafka_orders",
                 "shop", "hosting", "rabbitmq_orders", "nats_orders", "redis_orders",
                 "mqtt_orders"):
        assert default_tests_file(PIPELINES / f"{name}.yaml").is_file(), name


def test_a_failing_case_exits_1_with_its_reason(tmp_path: Path) -> None:
    tests = write_tests(tmp_path, """\
        cases:
          - name: right width
            payload: {image: cat.png, width: 64}
            expect: result
            result: {thumbnail: cat-64w.png, width: 64}
          - name: wrong width
            payload: {image: cat.png, width: 64}
            expect: result
            result: {thumbnail: cat-64w.png, width: 65}
          - name: a reject is not a retry
            payload: {image: cat.png, width: 0}
            expect: retry
        """)
    result = sluice_test(QUICKSTART, "--tests", tests)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout and "pass" in result.stdout
    assert "1 passed, 2 failed" in result.stdout
    cases = cases_of(sluice_test(QUICKSTART, "--tests", tests, "--json"))
    assert cases["wrong width"]["reason"] == "result.width: expected 65, got 64"
    assert cases["right width"]["passed"] is True and cases["right width"]["reason"] is None
    assert cases["a reject is not a retry"]["got"] == "reject Reject → dead_lettered"
    assert "width must be a positive integer" in str(cases["a reject is not a retry"]["reason"])


def test_results_compare_as_json_and_result_contains_is_a_subset(tmp_path: Path) -> None:
    pipeline = own_pipeline(tmp_path, """\
        def handle(message):
            return {"ok": True, "n": 2, "items": [{"a": 1, "b": 2}], "extra": None}
        """)
    tests = write_tests(tmp_path, """\
        cases:
          - {name: equal, payload: 1, expect: result,
             result: {ok: true, n: 2.0, items: [{a: 1, b: 2}], extra: null}}
          - {name: a key more, payload: 1, expect: result, result: {ok: true, n: 2}}
          - {name: true is not 1, payload: 1, expect: result, result_contains: {ok: 1}}
          - {name: part, payload: 1, expect: result, result_contains: {items: [{b: 2}]}}
          - {name: list length, payload: 1, expect: result, result_contains: {items: []}}
        """)
    cases = cases_of(sluice_test(pipeline, "--tests", tests, "--json"))
    assert {n: c["passed"] for n, c in cases.items()} == {
        "equal": True, "a key more": False, "true is not 1": False, "part": True,
        "list length": False}
    assert "unexpected key 'extra'" in str(cases["a key more"]["reason"])
    assert cases["true is not 1"]["reason"] == "result.ok: expected 1, got true"


def test_retries_run_up_to_max_attempts_with_attempt_numbers(tmp_path: Path) -> None:
    tests = write_tests(tmp_path, """\
        cases:
          - {name: third time lucky, payload: {image: a.png, flaky: 2}, expect: result}
          - name: never
            payload: {image: a.png, flaky: 3}
            expect: dead_lettered
            error_type: ConnectionError
            error_contains: gave up after 3 attempts (max_attempts=3)
          - {name: retried once, payload: {image: a.png, flaky: 1}, expect: retry}
          - {name: not a reject, payload: {image: a.png, flaky: 9}, expect: reject}
        """)
    cases = cases_of(sluice_test(QUICKSTART, "--tests", tests, "--json"))
    assert cases["third time lucky"]["attempts"] == 3 and cases["third time lucky"]["passed"]
    assert cases["never"]["attempts"] == 3 and cases["never"]["passed"], cases["never"]
    assert cases["never"]["got"] == "retry ConnectionError x3 → dead_lettered"
    assert cases["retried once"]["passed"]
    assert not cases["not a reject"]["passed"]


async def test_each_attempt_has_its_number_and_max_age_counts_the_delays(
        tmp_path: Path) -> None:
    pipeline = own_pipeline(tmp_path, """\
        from sluice import Retry

        SEEN = []

        def handle(message):
            SEEN.append((message.task_id, message.attempt))
            if message.payload == "slow":
                raise Retry("later", delay_s=100)
            raise ConnectionError("down")
        """, "consumer:\n  retry: {max_attempts: 4, initial_backoff_s: 0.5, max_age_s: 150}\n")
    config = load_pipeline(pipeline)
    tests = write_tests(tmp_path, """\
        cases:
          - {name: down, payload: down, expect: dead_lettered, error_type: ConnectionError}
          - {name: slow, payload: slow, expect: dead_lettered, error_contains: max_age_s=150}
        """)
    reports = await run_cases(config, load_cases(tests, config))  # nothing sleeps 100 s
    assert [(r.name, r.passed, r.attempts) for r in reports] == [("down", True, 4),
                                                                  ("slow", True, 2)]
    module = __import__(config.handler.config.split(":")[0])
    seen = module.SEEN
    assert [attempt for _, attempt in seen] == [1, 2, 3, 4, 1, 2]
    assert len({task for task, _ in seen[:4]}) == 1 and seen[0][0] != seen[4][0]


def test_the_filter_and_the_schema_apply_before_the_handler(tmp_path: Path) -> None:
    tests = write_tests(tmp_path, """\
        cases:
          - {name: refund, payload: {kind: refund, item: book, qty: 1}, expect: filtered}
          - name: qty 0
            payload: {kind: order, item: book, qty: 0}
            expect: dead_lettered
            error_type: InvalidPayload
            error_contains: "schema: $.qty"
          - {name: not json, body: "{oops", expect: dead_lettered, error_type: InvalidPayload}
          - {name: schema is no reject, payload: {kind: order, qty: 1}, expect: reject}
          - {name: an order is not filtered, payload: {kind: order, item: pen, qty: 1},
             expect: filtered}
        """)
    result = sluice_test(SHOP, "--tests", tests, "--json")
    assert result.exit_code == 1
    cases = cases_of(result)
    assert [n for n, c in cases.items() if c["passed"]] == ["refund", "qty 0", "not json"]
    assert cases["refund"]["got"] == "filtered" and cases["refund"]["attempts"] == 0
    assert cases["qty 0"]["got"] == "dead_lettered InvalidPayload (before the handler)"
    assert str(cases["schema is no reject"]["reason"]).startswith(
        "refused before the handler: schema: $: 'item' is a required property")
    assert cases["an order is not filtered"]["got"] == "result"


def test_a_hosting_pipeline_runs_the_function_a_case_names(tmp_path: Path) -> None:
    tests = write_tests(tmp_path, """\
        cases:
          - {name: default tenant, function: resize, payload: {image: a.png},
             expect: result, result: {resized: a.png, for: default}}
          - {name: no function, payload: {image: a.png}, expect: reject,
             error_type: UnknownFunction, error_contains: "no function 'default'"}
        """)
    result = sluice_test(PIPELINES / "hosting.yaml", "--tests", tests)
    assert result.exit_code == 0, result.output


def test_a_bad_tests_file_names_file_line_col_and_key(tmp_path: Path) -> None:
    tests = write_tests(tmp_path, """\
        cases:
          - name: typo
            payload: {image: cat.png}
            expect: sucess
          - name: both
            payload: {}
            body: "{}"
            expect: result
            error_type: Reject
            function: resize
          - {name: typo, paylod: 1, expect: result}
        """)
    result = sluice_test(QUICKSTART, "--tests", tests)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert lines == [
        f"{tests}:4:13: cases[0].expect: expected one of 'result', 'retry', 'reject', "
        "'filtered', 'dead_lettered', got 'sucess'",
        f"{tests}:11:18: cases[2].paylod: unknown key 'paylod' (did you mean 'payload'?); "
        "expected one of: body, content_type, error_contains, error_type, expect, function, "
        "headers, key, name, payload, result, result_contains, tenant"]
    fixed = tests.read_text().replace("sucess", "result").replace("paylod", "payload")
    tests.write_text(fixed)
    result = sluice_test(QUICKSTART, "--tests", tests)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{tests}:7:5: cases[1].body: give payload (a JSON value) or body (raw text), not both",
        f"{tests}:9:5: cases[1].error_type: error_type goes with expect: retry, reject, "
        "dead_lettered; this case expects result",
        f"{tests}:10:5: cases[1].function: function is for a hosting pipeline (one with a "
        "tenancy: key); pipeline 'thumbnails' has none",
        f"{tests}:11:12: cases[2].name: case 'typo' is also named on line 2; give each case its "
        "own name"]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("text", "expected"), [
    ("", "the file is empty"),
    ("- name: x\n", "expected a tests file"),
    ("cases: []\n", "1:8: cases: expected at least one case, got none"),
    ("cases:\n- {name: x, payload: {at: 2024-01-02}, expect: result}\n",
     "2:22: cases[0].payload: expected a JSON value"),
    ("cases:\n- {name: x, payload: {a: 1}, content_type: text/plain, expect: result}\n",
     "2:22: cases[0].payload: under content_type 'text/plain' (not JSON)"),
    ("cases:\n- {name: x, payload: 1, headers: {n: 1}, expect: result}\n",
     "2:38: cases[0].headers.n: expected a string, got 1"),
    ("cases:\n- {name: x, expect: result}\n", "2:3: cases[0]: missing required key 'payload'"),
])
def test_tests_file_problems_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    tests = tmp_path / "t.tests.yaml"
    tests.write_text(text)
    result = sluice_test(QUICKSTART, "--tests", tests)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr


def test_no_tests_file_exits_2_saying_where_it_looked(tmp_path: Path) -> None:
    pipeline = tmp_path / "quick.yaml"
    pipeline.write_text(QUICKSTART.read_text())
    result = sluice_test(pipeline)
    assert result.exit_code == 2
    assert f"looked for {tmp_path / 'quick.tests.yaml'}" in result.stderr


def test_case_runs_only_the_named_cases_and_refuses_an_unknown_name() -> None:
    result = sluice_test(QUICKSTART, "--json", "--case", "makes a thumbnail",
                         "--case", "a bad width is rejected at once")
    assert result.exit_code == 0, result.output
    assert list(cases_of(result)) == ["makes a thumbnail", "a bad width is rejected at once"]
    result = sluice_test(QUICKSTART, "--case", "no such case")
    assert result.exit_code == 2
    assert "no case named 'no such case'" in result.stderr


def test_loading_refuses_hosting_keys_on_a_one_function_pipeline(tmp_path: Path) -> None:
    config = load_pipeline(QUICKSTART)
    tests = write_tests(tmp_path, "cases:\n- {name: x, payload: 1, tenant: acme, expect: retry}\n")
    with pytest.raises(ConfigError) as info:
        load_cases(tests, config)
    (issue,) = info.value.issues
    assert (issue.line, issue.col, issue.path) == (2, 25, "cases[0].tenant")


@pytest.fixture
async def function_url() -> AsyncIterator[str]:
    """An HTTP function: answers with the status its payload names (200: the payload back)."""

    async def handle(request: web.Request) -> web.Response:
        payload = await request.json()
        if payload["status"] == 200:
            return web.json_response({"echo": payload, "attempt": request.headers.get(
                "ce-sluiceattempt")})
        return web.Response(status=payload["status"], text="no")

    app = web.Application()
    app.router.add_post("/fn", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/fn"
    await runner.cleanup()


async def test_an_http_handler_is_called_for_real(tmp_path: Path, function_url: str) -> None:
    pipeline = tmp_path / "fn.yaml"
    pipeline.write_text(f"name: fn\nsource:\n  embedded: {{queue: fn}}\nhandler:\n"
                        f"  http: {{url: \"{function_url}\"}}\n")
    config = load_pipeline(pipeline)
    tests = write_tests(tmp_path, """\
        cases:
          - {name: ok, payload: {status: 200}, expect: result,
             result: {echo: {status: 200}, attempt: "1"}}
          - {name: busy, payload: {status: 503}, expect: retry}
          - {name: gone, payload: {status: 503}, expect: dead_lettered}
          - {name: refused, payload: {status: 422}, expect: reject}
        """)
    reports = await run_cases(config, load_cases(tests, config))
    assert [(r.name, r.passed, r.attempts) for r in reports] == [
        ("ok", True, 1), ("busy", True, 3), ("gone", True, 3), ("refused", True, 1)], reports


def test_the_docs_list_every_key_of_a_case() -> None:
    page = (ROOT / "docs" / "testing-pipelines.md").read_text(encoding="utf-8")
    missing = [f.name for f in CASE_SPEC.fields_ if f"| `{f.name}` |" not in page]
    assert not missing, f"docs/testing-pipelines.md lacks a row for {missing}"
