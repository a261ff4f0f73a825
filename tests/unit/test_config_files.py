"""Pipeline files the YAML library, the decoder or the file system refuse: `sluice validate`
(a real process) prints one `file:line:col: ...` line saying what was expected, exits 2, and
never prints a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sluice.config.load import load_pipeline, load_pipelines
from sluice.errors import ConfigError
from tests.conftest import ROOT, sluice_cmd, subprocess_env

GOOD = "name: x\nsource: {embedded: {}}\nhandler: {python: tests.helpers.handlers:echo}\n"
PIPELINE_FILE = ("expected a pipeline file: a YAML mapping of pipeline keys "
                 "(name, source, handler, ...)")
LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}' if prev else 'x'] * 10)}]\n"
    for prev, name in zip(["", "a", "b", "c"], "abcd", strict=True)
) + "f: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n"  # d: 11,111 values; f: 111,111
CONTROL = ("is not allowed in YAML (control characters other than tab and line breaks are "
           "not); remove it, or write it as")

# (file bytes, the one line expected on stderr after "<file>:")
BAD: dict[str, tuple[bytes, str]] = {
    "nul": (b"name: a\x00b\n",
            f'1:8: character U+0000 (NUL) {CONTROL} "\\x00" inside a double-quoted string'),
    "escape": (b"name: x\nsource: {embedded: {}}\nhandler: {python: a\x1b:b}\n",
               f'3:20: character U+001B (ESC) {CONTROL} "\\x1B" inside a double-quoted string'),
    "c1-control-after-crlf": ("name: x\r\nsource: \u0086\n".encode(),
                              f'2:9: character U+0086 {CONTROL} "\\x86" inside a double-quoted '
                              "string"),
    "noncharacter": ("name: x\nsource: a\uffff\n".encode(),
                     f'2:10: character U+FFFF (noncharacter) {CONTROL} "\\uFFFF" inside a '
                     "double-quoted string"),
    "latin-1": ("name: x\nsource: {embedded: {queue: café}}\n".encode("latin-1"),
                "2:31: the file is not valid UTF-8: cannot decode byte(s) 0xE9 (invalid "
                "continuation byte); save the file as UTF-8 (it may have been saved as "
                "Latin-1 or Windows-1252)"),
    "utf-16-without-bom": (GOOD.encode("utf-16-le"), "1:1: the file looks like UTF-16 "
                           "(little-endian) without a byte-order mark; save it as UTF-8"),
    "utf-16be-without-bom": (GOOD.encode("utf-16-be"), "1:1: the file looks like UTF-16 "
                             "(big-endian) without a byte-order mark; save it as UTF-8"),
    "utf-32-without-bom": (GOOD.encode("utf-32-le"), "1:1: the file looks like UTF-32 "
                           "(little-endian) without a byte-order mark; save it as UTF-8"),
    "utf-16-truncated": (GOOD.encode("utf-16")[:-1], "3:47: the file is not valid UTF-16: "
                         "cannot decode byte(s) 0x0A (truncated data); save the file as UTF-8"),
    "empty": (b"", f"1:1: the file is empty; {PIPELINE_FILE}"),
    "only-comments": (b"# a pipeline\n\n", f"1:1: the file holds only comments; {PIPELINE_FILE}"),
    "top-level-list": (b"- name: x\n", f"1:1: {PIPELINE_FILE}, got a list"),
    "top-level-string": (b"hello\n", f"1:1: {PIPELINE_FILE}, got 'hello'"),
    "top-level-null": (b"~\n", f"1:1: {PIPELINE_FILE}, got nothing (null)"),
    "deep-flow-nesting": (b"name: " + b"[" * 2000 + b"]" * 2000 + b"\n",
                          "1:70: invalid YAML: nested deeper than 64 levels; expected at most "
                          "64 (a pipeline file needs about 6)"),
    "deep-block-nesting": (("name: x\n" + "".join("  " * i + f"k{i}:\n" for i in range(100))
                            + "  " * 100 + "v\n").encode(),
                           "65:127: invalid YAML: nested deeper than 64 levels; expected at "
                           "most 64 (a pipeline file needs about 6)"),
    "alias-cycle": (b"name: x\nsource: &s {embedded: *s}\n",
                    "2:9: source.embedded: an alias refers to a mapping or list that contains "
                    "it; expected a value without cycles"),
    "alias-expansion": (LAUGHS.encode(), "5:1: f: the value expands to more than 100,000 "
                        "values (through aliases); expected a few"),
    "tab-indent": (b"name: x\nsource:\n\tembedded: {}\n",
                   "3:1: invalid YAML: found character '\\t' that cannot start any token; "
                   "indent with spaces (YAML does not allow tabs there)"),
    "unclosed-flow": (b"name: x\nsource: {embedded: {}\nhandler: x\n",
                      "3:1: invalid YAML: while parsing a flow mapping (line 2, column 9): "
                      "expected ',' or '}', but got '<scalar>'"),
    "unclosed-quote": (b"name: 'x\n", "2:1: invalid YAML: while scanning a quoted scalar "
                       "(line 1, column 7): found unexpected end of stream"),
    "reserved-indicator": (b"name: @x\n", "1:7: invalid YAML: found character '@' that cannot "
                           "start any token; quote the value if it starts with this character"),
    "colon-in-value": (b"name: a: b\n", "1:8: invalid YAML: mapping values are not allowed "
                       "here (quote a value that contains ': ')"),
    "undefined-alias": (b"name: *nope\n", "1:7: invalid YAML: found undefined alias 'nope'"),
    "duplicate-anchor": (b"name: &a x\ntenant: &a y\n",
                         "2:9: invalid YAML: found duplicate anchor 'a'; first occurrence "
                         "(line 1, column 7): second occurrence"),
    "two-documents": (b"name: x\n---\nname: y\n",
                      "2:1: invalid YAML: expected a single document in the stream (line 1, "
                      "column 1): but found another document (a file holds one document)"),
    "yaml-2-directive": (b"%YAML 2.0\n---\nname: x\n", "1:1: invalid YAML: found incompatible "
                         "YAML document (version 1.* is required)"),
    "python-tag": (b"name: !!python/object/apply:os.system [ls]\n",
                   "1:7: name: unsupported tag 'tag:yaml.org,2002:python/object/apply:os.system'"
                   " on a list; expected a plain list (remove the tag)"),
    "unknown-scalar-tag": (b"name: !!python/name:os.system x\n",
                           "1:7: name: invalid value: could not determine a constructor for the "
                           "tag 'tag:yaml.org,2002:python/name:os.system'"),
    "impossible-date": (b"name: x\ncreated: 2024-13-45\n",
                        "2:10: created: invalid value '2024-13-45' (read as a YAML timestamp): "
                        "month must be in 1..12; quote it if it is meant as text"),
    "int-tag-on-text": (b"name: !!int x\n", "1:7: name: invalid value 'x' (read as a YAML int): "
                        "invalid literal for int() with base 10: 'x'; quote it if it is meant "
                        "as text"),
    "set-tag": (b"name: x\nsource: !!set {a, b}\n", "2:9: source: unsupported tag "
                "'tag:yaml.org,2002:set' on a mapping; expected a plain mapping (remove the tag)"),
    "merge-key": (b"base: &b {embedded: {}}\nname: x\nsource:\n  <<: *b\n",
                  "4:3: source: merge keys (<<) are not supported; write the keys out"),
    "complex-key": (b"? [a]\n: 1\n", "1:3: keys must be plain strings"),
    "too-large": (b"# " + b"x" * (1 << 20) + b"\n",
                  f"1:1: the file is larger than 1024 KiB; {PIPELINE_FILE}"),
}


def validate(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), "validate", *map(str, files)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)


def assert_refused(file: Path, expected: str) -> None:
    result = validate(file)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [f"{file}:{expected}"]


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Every file of BAD through one `sluice validate` (each file is checked on its own)."""
    folder = tmp_path_factory.mktemp("bad")
    for case, (content, _) in BAD.items():
        (folder / f"{case}.yaml").write_bytes(content)
    result = validate(*(folder / f"{case}.yaml" for case in sorted(BAD)))
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, result.stdout) == (2, ""), result
    return folder, result.stderr


@pytest.mark.parametrize("case", sorted(BAD))
def test_validate_refuses_with_file_line_col(case: str, validated: tuple[Path, str]) -> None:
    folder, stderr = validated
    file = folder / f"{case}.yaml"
    assert [line for line in stderr.splitlines() if line.startswith(f"{file}:")] == [
        f"{file}:{BAD[case][1]}"]


def test_one_bad_file_alone(tmp_path: Path) -> None:
    file = tmp_path / "p.yaml"
    file.write_bytes(BAD["nul"][0])
    assert_refused(file, BAD["nul"][1])


def test_directory_missing_and_unreadable_files(tmp_path: Path) -> None:
    folder = tmp_path / "pipeline.yaml"
    folder.mkdir()
    assert_refused(folder, f"1:1: this is a directory; {PIPELINE_FILE}")
    assert_refused(tmp_path / "nope.yaml", f"1:1: no such file; {PIPELINE_FILE}")
    if os.geteuid() == 0:
        return  # root reads a file without read permission
    locked = tmp_path / "locked.yaml"
    locked.write_text(GOOD)
    locked.chmod(0)
    try:
        assert_refused(locked, "1:1: cannot read the file: permission denied (it needs read "
                       "permission for this user)")
    finally:
        locked.chmod(0o600)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_encodings_with_a_byte_order_mark_are_read(encoding: str, tmp_path: Path) -> None:
    file = tmp_path / "p.yaml"
    file.write_bytes(GOOD.encode(encoding))
    assert load_pipeline(file).name == "x"
    result = validate(file)
    assert (result.returncode, result.stdout) == (0, f"{file}: ok\n"), result.stderr


def write(path: Path, name: str, tenant: str = "default") -> Path:
    path.write_text(f"name: {name}\ntenant: {tenant}\nsource: {{embedded: {{}}}}\n"
                    "handler: {python: tests.helpers.handlers:echo}\n")
    return path


def test_one_pipeline_name_in_two_files_is_refused(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "orders", "acme")
    b = write(tmp_path / "b.yaml", "orders", "globex")
    c = write(tmp_path / "c.yaml", "orders")
    d = write(tmp_path / "d.yaml", "other")
    with pytest.raises(ConfigError) as info:
        load_pipelines([a, d, b, c])
    assert [str(i) for i in info.value.issues] == [
        f"{b}:1:7: name: pipeline name 'orders' is also given by {a}:1:7 (there for tenant "
        "'acme', here for tenant 'globex': their tasks would be mixed); pipeline names are "
        "global in a task store: give each pipeline its own name",
        f"{c}:1:7: name: pipeline name 'orders' is also given by {a}:1:7 (there for tenant "
        "'acme', here for tenant 'default': their tasks would be mixed); pipeline names are "
        "global in a task store: give each pipeline its own name",
    ]
    with pytest.raises(ConfigError) as info:
        load_pipelines([d, a, d])
    assert [str(i) for i in info.value.issues] == [
        f"{d}:1:1: this file is given twice; give each file once"]
    assert [c.name for c in load_pipelines([a, d])] == ["orders", "other"]


def test_same_name_same_tenant_names_both_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "orders")
    b = write(tmp_path / "b.yaml", "orders")
    with pytest.raises(ConfigError) as info:
        load_pipelines([a, b])
    assert str(info.value) == (
        f"{b}:1:7: name: pipeline name 'orders' is also given by {a}:1:7; pipeline names are "
        "global in a task store: give each pipeline its own name")


def test_run_refuses_one_name_in_two_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "orders", "acme")
    b = write(tmp_path / "b.yaml", "orders", "globex")
    result = subprocess.run([*sluice_cmd(), "run", str(a), str(b), "--drain", "--data-dir",
                             str(tmp_path / "data")], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{b}:1:7: name: pipeline name 'orders' is also given by {a}:1:7 (there for tenant "
        "'acme', here for tenant 'globex': their tasks would be mixed); pipeline names are "
        "global in a task store: give each pipeline its own name"]
    assert not (tmp_path / "data").exists()
