"""Start `sluice serve` as a real process on a free port, for tests over real HTTP."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT, sluice_cmd, subprocess_env

GW = ROOT / "tests" / "helpers" / "gw"
KEYS = {"alpha": "alpha-key-0123456789", "beta": "beta-key-0123456789",
        "admin": "admin-key-0123456789"}


@dataclass
class Server:
    url: str
    data_dir: Path
    log: str
    proc: subprocess.Popen[str]

    def headers(self, who: str = "alpha") -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[who]}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_keys(path: Path) -> Path:
    lines = ["keys:"]
    for who, key in KEYS.items():
        digest = hashlib.sha256(key.encode()).hexdigest()
        who_yaml = "admin: true" if who == "admin" else f"tenant: {who}"
        lines.append(f"  - {{{who_yaml}, sha256: {digest}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def running_server(tmp: Path, *extra: str, files: tuple[Path, ...] = (GW / "a.yaml",
                                                                       GW / "b.yaml"),
                   auth: bool = True, **env: str) -> Iterator[Server]:
    port = free_port()
    data_dir = tmp / "data"
    log = str(tmp / "calls.log")
    args = [*sluice_cmd(), "serve", *map(str, files), "--port", str(port),
            "--data-dir", str(data_dir), "--log-level", "warning", *extra]
    if auth:
        args += ["--auth-file", str(write_keys(tmp / "keys.yaml"))]
    proc = subprocess.Popen(args, cwd=ROOT, env=subprocess_env(SLUICE_TEST_LOG=log, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _, errs = proc.communicate(timeout=5)
                raise RuntimeError(f"sluice serve did not start: {errs}") from None
            time.sleep(0.1)
    try:
        yield Server(url, data_dir, log, proc)
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
