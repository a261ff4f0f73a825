"""A definition put with a tenant's key reads nothing of the server's (parse_pipeline's
``trusted=False``): no environment variables, no schema files."""

from __future__ import annotations

import pytest

from sluice.config.load import parse_pipeline
from sluice.errors import ConfigError

BASE = """\
name: p
source: {embedded: {queue: p}}
handler: {http: {url: "http://example.com/%s"}}
"""


def test_an_environment_variable_is_refused_with_its_place(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_TEST_SECRET", "hunter2")
    text = BASE % "${SLUICE_TEST_SECRET}"
    assert parse_pipeline(text, "store:p").handler.config["url"].endswith("/hunter2")
    with pytest.raises(ConfigError) as caught:
        parse_pipeline(text, "store:p", trusted=False)
    (issue,) = caught.value.issues
    assert (issue.file, issue.line, issue.path) == ("store:p", 3, "handler.http.url")
    assert "cannot read the server's environment" in issue.message
    assert "hunter2" not in str(caught.value)


def test_a_default_is_still_given() -> None:
    config = parse_pipeline(BASE % "${SLUICE_UNSET_NAME:-fallback}", "store:p", trusted=False)
    assert config.handler.config["url"] == "http://example.com/fallback"


def test_a_schema_file_is_refused_an_inline_schema_is_not() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pipeline(BASE % "x" + "schema: /etc/passwd.json\n", "store:p", trusted=False)
    (issue,) = caught.value.issues
    assert issue.path == "schema" and "cannot read the server's files" in issue.message
    inline = BASE % "x" + "schema: {type: object}\n"
    assert parse_pipeline(inline, "store:p", trusted=False).schema == {"type": "object"}
