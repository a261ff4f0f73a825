"""``sluice test``: a pipeline's handler run over the cases of its tests file, with no broker.

A tests file sits beside its pipeline (``pipelines/shop.yaml`` → ``pipelines/shop.tests.yaml``)
and lists cases, each an input message and the outcome expected of it
(:mod:`sluice.pipeline_tests_file`; docs/testing-pipelines.md). The source is never built or
contacted. The handler is the one the pipeline's workers build
(:class:`sluice.runtime.DeferredHandler`: a Python function imported, an HTTP function URL
called for real), behind the pipeline's own gate
(:func:`sluice.consumer.gate.gate_for`) and retry policy
(:class:`sluice.consumer.retry.RetryPolicy`).

How a case's outcome is decided, in order:

1. The message is made from the case: ``payload`` JSON-encoded under a JSON content type (the
   default, ``application/json``) or, a string, as its UTF-8 text under another; or ``body``
   as it is; with its ``key`` and ``headers``; for a hosting pipeline (``tenancy:``) with its
   ``tenant`` (default: the pipeline's) and ``function`` (default: ``default``).
2. The gate, as the consumer loop applies it (its rule 14): a message the pipeline's
   ``schema`` refuses (or whose JSON body does not parse, where the gate reads it) ends
   ``dead_lettered`` with the error type ``InvalidPayload``; one its ``filter`` drops ends
   ``filtered``. The handler is not called for either.
3. Otherwise the handler runs attempt 1, 2, ... (``Message.attempt``), each within
   ``consumer.timeout_s``, all with one task id. A batch handler (``handler.batch``) is called
   as the pipeline calls it, with a list: here a list of this one message per attempt.
4. After a retry outcome another attempt follows while the retry policy allows one
   (``consumer.retry.max_attempts``; ``max_age_s`` on a simulated clock moved on by each
   attempt's duration and retry delay: the handler's ``Retry(delay_s=...)``, else the
   backoff, drawn with a fixed seed). Nothing sleeps. The attempts end at a success (the case
   ends ``result``), a failure (a reject: ``dead_lettered``) or a retry the policy refuses
   (``dead_lettered``).
5. What each expectation asks:
   ``result``: the last attempt succeeded (a retried case may succeed at a later attempt);
   with ``result:`` its value equals that one as JSON (``1`` equals ``1.0``, ``true`` is not
   ``1``); with ``result_contains:`` each key given is in the result with a value matching
   the same way (recursively: a mapping may have more keys, a list matches item by item).
   ``retry``: the first attempt asked for a retry (it raised an error other than Reject).
   ``reject``: the first attempt failed for good (Reject, InvalidPayload, UnknownFunction, a
   result JSON cannot store); a gate refusal is not a reject (the handler did not run).
   ``filtered``: the filter dropped it. ``dead_lettered``: it ends in the dead letter (a gate
   refusal, a reject, or retries used up).
6. ``error_type`` (with retry, reject, dead_lettered) equals the error type of the first
   attempt for retry and reject, of the last (or of the gate's refusal) for dead_lettered;
   ``error_contains`` is a part of that error's message.
"""

from __future__ import annotations

import json
import random
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click
from rich.text import Text

from sluice.cli_common import fail, guarded, print_wide, run_async, say, table
from sluice.config.load import load_pipeline
from sluice.config.model import PipelineConfig
from sluice.consumer.gate import Gate, gate_for
from sluice.consumer.retry import RetryPolicy
from sluice.message import Message, Outcome, is_json, loads_json
from sluice.pipeline_tests_file import Case, default_tests_file, load_cases, select

if TYPE_CHECKING:
    from sluice.runtime import DeferredHandler

BACKOFF_SEED = 0  # the retry delays drawn for rule 4: the same on every run
SHOWN_CHARS = 120  # of a value quoted in a failure's reason


@dataclass(frozen=True, slots=True)
class Step:
    """One attempt's outcome."""

    status: Literal["result", "retry", "reject"]
    error_type: str | None
    error_message: str | None
    value: Any  # the result of a success, decoded


@dataclass(frozen=True, slots=True)
class Run:
    """What happened to one case's message (rules 2-4)."""

    ending: Literal["result", "filtered", "dead_lettered"]
    steps: tuple[Step, ...] = ()
    error_type: str | None = None  # of the dead letter
    error_message: str | None = None

    def described(self) -> str:
        """Its attempts in a few words: ``retry ConnectionError x2 → result``."""
        if not self.steps:
            return self.ending if self.ending == "filtered" else \
                f"dead_lettered {self.error_type} (before the handler)"
        words = []
        for (status, error_type), same in groupby(self.steps, lambda s: (s.status, s.error_type)):
            count = len(list(same))
            word = f"{status} {error_type}" if error_type else status
            words.append(word + (f" x{count}" if count > 1 else ""))
        if self.ending == "dead_lettered":
            words.append("dead_lettered")
        return " → ".join(words)


@dataclass(frozen=True, slots=True)
class CaseReport:
    """One case's line of the report."""

    name: str
    expected: str
    got: str
    passed: bool
    reason: str | None  # why it failed
    attempts: int

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "expected": self.expected, "got": self.got,
                "passed": self.passed, "reason": self.reason, "attempts": self.attempts}


# -- running ------------------------------------------------------------------------------------

async def run_cases(config: PipelineConfig, cases: Sequence[Case]) -> list[CaseReport]:
    """Run every case as rules 1-4 say and judge it (rules 5-6). Raises :class:`ConfigError`
    when the handler cannot be built (its code does not import)."""
    from sluice import runtime  # a worker's wiring: loaded when cases run, not by every command

    handler = runtime.DeferredHandler(config, runtime.context(config, None))
    try:
        handler.build()
        gate = gate_for(config)
        policy = RetryPolicy(config.consumer.retry, random.Random(BACKOFF_SEED))
        reports = []
        for case in cases:
            run = await run_case(config, handler, gate, policy, case)
            reason = judge(case, run)
            reports.append(CaseReport(case.name, case.described(), run.described(),
                                      reason is None, reason, len(run.steps)))
        return reports
    finally:
        await handler.close()


async def run_case(config: PipelineConfig, handler: DeferredHandler, gate: Gate | None,
                   policy: RetryPolicy, case: Case) -> Run:
    """The gate (rule 2), then the attempts (rules 3-4)."""
    if gate is not None:  # rule 2
        verdict = gate.check(case.body, case.content_type, case.key, case.headers)
        if not verdict.run:
            if verdict.invalid is None:
                return Run("filtered")
            return Run("dead_lettered", (), "InvalidPayload", verdict.invalid)
    task_id = f"test-{uuid.uuid4().hex}"  # one task: every attempt of the case has it
    steps: list[Step] = []
    clock_s = 0.0  # since the task was received (rule 4)
    while True:
        attempt = len(steps) + 1  # rule 3
        outcome = await _attempt(config, handler, _message(config, case, task_id, attempt))
        steps.append(_step(outcome))
        if outcome.status == "success":
            return Run("result", tuple(steps))
        error_message = outcome.error_message
        if outcome.status == "retry":  # rule 4
            clock_s += outcome.duration_s
            decision = policy.decide(attempt, 0.0, clock_s, outcome.delay_s)
            if decision.retry:
                clock_s += decision.delay_s
                continue
            error_message = f"{error_message} ({decision.reason})"
        return Run("dead_lettered", tuple(steps), outcome.error_type, error_message)


def _message(config: PipelineConfig, case: Case, task_id: str, attempt: int) -> Message:
    hosting = config.tenancy is not None
    return Message(task_id, config.name, body=case.body, content_type=case.content_type,
                   key=case.key, headers=case.headers, attempt=attempt,
                   tenant=(case.tenant or config.tenant) if hosting else None,
                   function=case.function if hosting else None)


async def _attempt(config: PipelineConfig, handler: DeferredHandler,
                   message: Message) -> Outcome:
    timeout_s = config.consumer.timeout_s
    if config.batch is not None:
        (outcome,) = await handler.invoke_batch([message], timeout_s)
        return outcome
    return await handler.invoke(message, timeout_s)


def _step(outcome: Outcome) -> Step:
    if outcome.status == "success":
        return Step("result", None, None, _result_value(outcome))
    status: Literal["retry", "reject"] = "retry" if outcome.status == "retry" else "reject"
    return Step(status, outcome.error_type, outcome.error_message, None)


def _result_value(outcome: Outcome) -> Any:
    """A success's result as a value: JSON decoded, other bytes as text, none as null."""
    if outcome.result is None:
        return None
    if outcome.result_type is not None and is_json(outcome.result_type):
        try:
            return loads_json(outcome.result)
        except ValueError:
            pass
    return outcome.result.decode("utf-8", errors="replace")


# -- judging ------------------------------------------------------------------------------------

def judge(case: Case, run: Run) -> str | None:
    """Why the case fails (rules 5-6), or None when it passes."""
    if case.expect in ("retry", "reject"):
        first = run.steps[0] if run.steps else None
        if first is None or first.status != case.expect:
            return _what_happened(run)
        return _error_mismatch(case, first.error_type, first.error_message)
    if case.expect != run.ending:
        return _what_happened(run)
    if case.expect == "dead_lettered":
        return _error_mismatch(case, run.error_type, run.error_message)
    if case.expect == "result":
        got = run.steps[-1].value
        if case.result_given:
            return _mismatch(case.result, got, "result", subset=False)
        if case.result_contains is not None:
            return _mismatch(case.result_contains, got, "result", subset=True)
    return None


def _what_happened(run: Run) -> str:
    """What the case came to, for the reason of a failure."""
    if run.ending == "filtered":
        return "the pipeline's filter dropped it"
    if not run.steps:
        return f"refused before the handler: {run.error_message}"
    if run.ending == "result":
        return f"the handler returned {_shown(run.steps[-1].value)}"
    return f"{run.error_type}: {run.error_message}"


def _error_mismatch(case: Case, error_type: str | None, message: str | None) -> str | None:
    if case.error_type is not None and case.error_type != error_type:
        return f"error type {error_type}, expected {case.error_type}: {message}"
    if case.error_contains is not None and case.error_contains not in (message or ""):
        return f"the error's message lacks {case.error_contains!r}: {message}"
    return None


def _mismatch(want: Any, got: Any, at: str, *, subset: bool) -> str | None:
    """Where ``got`` differs from ``want`` as JSON (rule 5); ``subset``: ``got``'s mappings
    may have more keys."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return f"{at}: expected a mapping, got {_shown(got)}"
        extra = sorted(set(got) - set(want))
        if extra and not subset:
            return f"{at}: unexpected key {extra[0]!r} (value {_shown(got[extra[0]])})"
        for key, value in want.items():
            if key not in got:
                return f"{at}.{key}: missing (expected {_shown(value)})"
            found = _mismatch(value, got[key], f"{at}.{key}", subset=subset)
            if found is not None:
                return found
        return None
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return f"{at}: expected {_shown(want)}, got {_shown(got)}"
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            found = _mismatch(w, g, f"{at}[{i}]", subset=subset)
            if found is not None:
                return found
        return None
    return None if _same_scalar(want, got) else f"{at}: expected {_shown(want)}, got {_shown(got)}"


def _same_scalar(want: Any, got: Any) -> bool:
    """JSON's equality: numbers by value (``1`` is ``1.0``), but a boolean is not a number."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (want, got))
    return bool(want == got) and (numbers or type(want) is type(got))


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


# -- the command --------------------------------------------------------------------------------

@click.command("test")
@click.argument("pipeline_file", metavar="PIPELINE",
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tests", "tests_file", metavar="FILE", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The tests file. Default: beside PIPELINE, its name with .tests.yaml "
              "(pipelines/shop.tests.yaml for pipelines/shop.yaml).")
@click.option("--case", "case_names", metavar="NAME", multiple=True,
              help="Run only the case of this name (repeatable).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: the pipeline, the tests file, the counts passed and "
              "failed, and each case (name, expected, got, passed, reason, attempts).")
def pipeline_test(pipeline_file: Path, tests_file: Path | None, case_names: Sequence[str],
                  as_json: bool) -> None:
    """Run PIPELINE's handler over the cases of its tests file, with no broker.

    Each case gives a message (payload or body, content_type, headers, key; a hosting
    pipeline's tenant and function) and the outcome expected of it: result, retry, reject,
    filtered or dead_lettered. The pipeline's schema and filter apply first; then its handler
    runs (an HTTP function URL is called), retried up to consumer.retry.max_attempts times
    without waiting. The source is never contacted. See docs/testing-pipelines.md.

    Prints one row per case and a summary. Exit codes: 0 every case passed, 1 a case failed,
    2 a bad pipeline or tests file (each problem at file:line:col) or no tests file.
    """
    config = guarded(lambda: load_pipeline(pipeline_file))
    path = tests_file or default_tests_file(pipeline_file)
    if tests_file is None and not path.exists():
        fail(f"no tests file for {pipeline_file}: looked for {path} (write one: see "
             "docs/testing-pipelines.md; or give --tests FILE)")
    every = guarded(lambda: load_cases(path, config))
    cases, unknown = select(every, case_names)
    if unknown:
        fail(f"{path}: no case named {unknown[0]!r}; its cases: "
             + ", ".join(repr(c.name) for c in every))
    reports = guarded(lambda: run_async(run_cases(config, cases)))
    failed = sum(not r.passed for r in reports)
    if as_json:
        click.echo(json.dumps({"pipeline": config.name, "pipeline_file": str(pipeline_file),
                               "tests_file": str(path), "passed": len(reports) - failed,
                               "failed": failed, "cases": [r.as_json() for r in reports]},
                              indent=2, ensure_ascii=False))
    else:
        _print_reports(reports, path)
    sys.exit(1 if failed else 0)


def _print_reports(reports: Sequence[CaseReport], tests_file: Path) -> None:
    rows = table("case", "expected", "got", "status", "reason", wrap=("reason",))
    for report in reports:
        status = Text("pass", "green") if report.passed else Text("FAIL", "bold red")
        rows.add_row(report.name, report.expected, report.got, status, report.reason or "")
    print_wide(rows)
    failed = sum(not r.passed for r in reports)
    say((f"{len(reports) - failed} passed", "green"), ", ",
        (f"{failed} failed", "bold red" if failed else ""), f" ({tests_file})")
