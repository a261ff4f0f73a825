"""What the CLI prints, as a user runs it (a real process, a real data directory): user data
literally, whole ids, clear errors for bad input and unknown names, nothing created by a
read-only command."""

from __future__ import annotations

import json
import os
import stat
import urllib.request
from pathlib import Path

from sluice.gateway.auth import KeyRing
from tests.e2e.test_cli import QUICKSTART, sluice
from tests.helpers.server import KEYS, running_server

MARKUP = "[/tmp] [bold]loud[/bold] :smile:"


def _pipeline(tmp_path: Path, name: str = "literal", handler: str = "echo") -> Path:
    file = tmp_path / f"{name}.yaml"
    file.write_text(f"name: {name}\nsource: {{embedded: {{}}}}\n"
                    f"handler: {{python: tests.helpers.handlers:{handler}}}\n"
                    "consumer: {retry: {max_attempts: 1}}\n")
    return file


def test_results_errors_ids_and_keys_print_literally(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    echo = _pipeline(tmp_path)
    rejecting = _pipeline(tmp_path, "rejecting", "behave")
    long_id = "id-[/tmp]-" + "x" * 90 + "-end"
    long_key = "key-[red]-" + "k" * 90 + "-end"
    assert sluice("submit", "literal", "-f", str(echo), "--data-dir", data, "--task-id", long_id,
                  "--key", long_key, "--data", json.dumps({"text": MARKUP})).returncode == 0
    assert sluice("submit", "rejecting", "-f", str(rejecting), "--data-dir", data,
                  "--task-id", "r1", "--data", '{"reject": "field [red] missing"}'
                  ).returncode == 0
    for file in (echo, rejecting):
        assert sluice("run", str(file), "--data-dir", data, "--drain").returncode == 0

    env = dict(os.environ, COLUMNS="60")  # narrower than the ids: nothing may be cut short
    shown = sluice("tasks", "get", long_id, "--data-dir", data, env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.dumps({"text": MARKUP}) in shown.stdout
    assert long_id in shown.stdout and long_key in shown.stdout
    failed = sluice("tasks", "get", "r1", "--data-dir", data, env=env)
    assert failed.returncode == 0, failed.stderr
    assert "field [red] missing" in failed.stdout

    listed = sluice("tasks", "list", "--data-dir", data, env=env)
    assert listed.returncode == 0, listed.stderr
    assert long_id in listed.stdout and long_key in listed.stdout
    assert "[red]" in listed.stdout  # the error column wraps between words
    assert "Traceback" not in listed.stderr + shown.stderr + failed.stderr


def test_submit_data_that_is_not_json_names_the_data(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    bad = sluice("submit", "thumbnails", "-f", str(QUICKSTART), "--data-dir", data,
                 "--data", '{"a": [/x]}')
    assert bad.returncode == 2
    assert bad.stderr.startswith("""error: --data '{"a": [/x]}': not valid JSON""")
    file = tmp_path / "bad.json"
    file.write_text('{"a": [/x]}')
    second = sluice("submit", "thumbnails", "-f", str(QUICKSTART), "--data-dir", data,
                    "--data", "{}", "--data", f"@{file}")
    assert second.returncode == 2
    assert second.stderr.startswith(f"error: --data #2 (@{file}): not valid JSON")
    file.write_bytes(b'{"a": "\xff"}')
    binary = sluice("submit", "thumbnails", "-f", str(QUICKSTART), "--data-dir", data,
                    "--data", f"@{file}")
    assert binary.returncode == 2 and "not valid JSON: not UTF-8" in binary.stderr
    for result in (bad, second, binary):
        assert "Traceback" not in result.stderr
    listed = sluice("tasks", "list", "--json", "--data-dir", data)
    assert listed.returncode == 2  # nothing was submitted, not even the good --data
    assert "no sluice data in" in listed.stderr


def test_read_only_commands_never_create_a_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    for args in (("tasks", "list"), ("tasks", "get", "x"), ("tasks", "summary"),
                 ("tasks", "cancel", "x"), ("pipelines", "list"),
                 ("pipelines", "pause", "thumbnails")):
        result = sluice(*args, "--data-dir", str(missing))
        assert result.returncode == 2, args
        assert result.stderr.startswith(f"error: no sluice data in {missing}"), args
        assert not missing.exists(), args
    from_file = sluice("pipelines", "list", "-f", str(QUICKSTART), "--json",
                       "--data-dir", str(missing))
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout) == {"name": "thumbnails", "tenant": "demo",
                                            "source": "embedded", "paused": False, "counts": {}}
    assert not missing.exists()


def test_summary_of_an_empty_store(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    paused = sluice("pipelines", "pause", "thumbnails", "-f", str(QUICKSTART), "--data-dir", data)
    assert paused.returncode == 0, paused.stderr
    summary = sluice("tasks", "summary", "--data-dir", data)
    assert summary.returncode == 0
    assert summary.stdout.strip() == "no tasks"
    doc = json.loads(sluice("tasks", "summary", "--json", "--data-dir", data).stdout)
    assert doc["counts"]["total"] == 0
    assert {s["p50_s"] for s in doc["stages"].values()} == {None}
    assert sluice("tasks", "list", "--data-dir", data).stdout.strip() == "no tasks"


def test_pipelines_pause_unknown_name_and_list(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    assert sluice("submit", "thumbnails", "-f", str(QUICKSTART), "--data-dir", data,
                  "--data", "{}").returncode == 0
    unknown = sluice("pipelines", "pause", "nosuchpipe", "--data-dir", data)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith(
        f"error: unknown pipeline 'nosuchpipe' in {data}; known: 'thumbnails'")
    # A pipeline with no tasks yet is known from its file.
    other = _pipeline(tmp_path, "later")
    early = sluice("pipelines", "pause", "later", "-f", str(other), "--data-dir", data)
    assert early.returncode == 0 and early.stdout.strip() == "later: paused"
    rows = [json.loads(line) for line in
            sluice("pipelines", "list", "--json", "--data-dir", data).stdout.splitlines()]
    assert rows == [
        {"name": "later", "tenant": None, "source": None, "paused": True, "counts": {}},
        {"name": "thumbnails", "tenant": "demo", "source": None, "paused": False,
         "counts": {"QUEUED": 1}},
    ]
    with_file = sluice("pipelines", "list", "-f", str(QUICKSTART), "--json", "--data-dir", data)
    assert json.loads(with_file.stdout.splitlines()[1])["source"] == "embedded"
    table = sluice("pipelines", "list", "--data-dir", data)
    assert table.returncode == 0
    assert "thumbnails" in table.stdout and "QUEUED 1" in table.stdout


def test_pipelines_list_and_pause_through_a_server(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        env = dict(os.environ, SLUICE_URL=server.url, SLUICE_TOKEN=KEYS["alpha"])
        rows = [json.loads(line) for line in
                sluice("pipelines", "list", "--json", env=env).stdout.splitlines()]
        assert [(r["name"], r["tenant"], r["source"], r["paused"]) for r in rows] == [
            ("gw-a", "alpha", "embedded", False)]
        unknown = sluice("pipelines", "pause", "gw-b", env=env)  # beta's: unknown to alpha
        assert unknown.returncode == 2
        assert unknown.stderr.startswith(
            f"error: unknown pipeline 'gw-b' on {server.url}; known: 'gw-a'")
        assert sluice("pipelines", "pause", "gw-a", env=env).stdout.strip() == "gw-a: paused"
        table = sluice("pipelines", "list", env=env)
        assert "gw-a" in table.stdout and "yes" in table.stdout
        req = urllib.request.Request(server.url + "/v1/pipelines", headers=server.headers())
        with urllib.request.urlopen(req) as resp:
            assert json.load(resp)["pipelines"][0]["paused"] is True


def test_keys_new_prints_a_valid_keys_file_and_appends(tmp_path: Path) -> None:
    printed = sluice("keys", "new", "--tenant", "acme")
    assert printed.returncode == 0
    file = tmp_path / "printed.yaml"
    file.write_text(printed.stdout)
    key = printed.stdout.split()[2]
    ring = KeyRing.load(file)
    who = ring.principal(f"Bearer {key}")
    assert who is not None and who.tenant == "acme"

    keys_file = tmp_path / "keys.yaml"
    first = sluice("keys", "new", "--tenant", "acme", "--append", str(keys_file))
    second = sluice("keys", "new", "--admin", "--name", "ops [on call]", "--append",
                    str(keys_file))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    ring = KeyRing.load(keys_file)
    acme = ring.principal(f"Bearer {first.stdout.strip()}")
    admin = ring.principal(f"Bearer {second.stdout.strip()}")
    assert acme is not None and acme.tenant == "acme"
    assert admin is not None and admin.admin

    flow = tmp_path / "flow.yaml"
    flow.write_text("keys: []\n")
    refused = sluice("keys", "new", "--tenant", "acme", "--append", str(flow))
    assert refused.returncode == 2 and "add it under `keys:` yourself" in refused.stderr
    assert flow.read_text() == "keys: []\n"
    assert refused.stdout == ""


def test_connectors_print_install_hints_literally() -> None:
    listed = sluice("connectors")
    assert listed.returncode == 0
    assert "(pip install 'sluice[kafka]')" in listed.stdout


def test_submit_and_serve_without_workers_never_import_the_handler(tmp_path: Path) -> None:
    api_only = tmp_path / "api-only.yaml"
    api_only.write_text("name: api-only\nsource: {embedded: {}}\n"
                        "handler: {python: not_on_this_machine.handlers:work}\n")
    data = str(tmp_path / "d")
    local = sluice("submit", "api-only", "-f", str(api_only), "--data-dir", data, "--data", "{}",
                   "--task-id", "local-1")
    assert local.returncode == 0, local.stderr
    assert sluice("pipelines", "pause", "api-only", "-f", str(api_only),
                  "--data-dir", data).returncode == 0
    with running_server(tmp_path, "--no-workers", files=(api_only,), auth=False) as server:
        remote = sluice("submit", "api-only", "--url", server.url, "--data", "{}",
                        "--task-id", "remote-1")
        assert remote.returncode == 0, remote.stderr
        assert remote.stdout.strip() == "remote-1"
    validate = sluice("validate", str(api_only))  # validate does import it
    assert validate.returncode == 2 and "not_on_this_machine" in validate.stderr


def test_tasks_get_shows_the_handlers_traceback(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    failing = _pipeline(tmp_path, "failing", "behave")
    assert sluice("submit", "failing", "-f", str(failing), "--data-dir", data, "--task-id", "f1",
                  "--data", '{"fail_until": 9}').returncode == 0
    assert sluice("run", str(failing), "--data-dir", data, "--drain").returncode == 0
    shown = sluice("tasks", "get", "f1", "--data-dir", data)
    assert shown.returncode == 0, shown.stderr
    error_at = shown.stdout.index("error  RuntimeError: failing attempt 1")
    traceback_at = shown.stdout.index("Traceback (most recent call last):")
    assert error_at < traceback_at
    assert "in behave" in shown.stdout[traceback_at:]
    got = json.loads(sluice("tasks", "get", "f1", "--json", "--data-dir", data).stdout)
    assert got["error"]["traceback"] in shown.stdout
