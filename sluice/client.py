"""A small synchronous client of the sluice HTTP API, used by the CLI's ``--url`` mode."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from sluice.errors import SluiceError


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: Any  # decoded JSON (a problem document for errors)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def detail(self) -> str:
        if isinstance(self.body, dict):
            return str(self.body.get("detail") or self.body.get("title") or self.body)
        return str(self.body)


class Client:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.base = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None,
                query: dict[str, str] | None = None) -> ApiResponse:
        url = self.base + path
        if query:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(query)
        all_headers = dict(headers or {})
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=body, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return ApiResponse(resp.status, _decode(resp.read()))
        except urllib.error.HTTPError as exc:
            return ApiResponse(exc.code, _decode(exc.read()))
        except (urllib.error.URLError, OSError) as exc:
            raise SluiceError(f"cannot reach the sluice server at {self.base}: "
                              f"{getattr(exc, 'reason', exc)}") from None

    def submit(self, pipeline: str, body: bytes, *, task_id: str | None = None,
               key: str | None = None, delay_s: float = 0.0,
               content_type: str = "application/json") -> ApiResponse:
        headers = {"Content-Type": content_type}
        if task_id:
            headers["Task-Id"] = task_id
        if key:
            headers["Task-Key"] = key
        if delay_s:
            headers["Delay-S"] = repr(delay_s)
        return self.request("POST", f"/v1/pipelines/{_q(pipeline)}/tasks", body, headers)

    def get_task(self, task_id: str, pipeline: str | None = None) -> ApiResponse:
        return self.request("GET", f"/v1/tasks/{_q(task_id)}",
                            query={"pipeline": pipeline} if pipeline else None)

    def list_tasks(self, **query: str) -> ApiResponse:
        return self.request("GET", "/v1/tasks", query={k: v for k, v in query.items() if v})

    def control_task(self, task_id: str, action: str, pipeline: str | None = None) -> ApiResponse:
        return self.request("POST", f"/v1/tasks/{_q(task_id)}/{action}",
                            query={"pipeline": pipeline} if pipeline else None)

    def list_pipelines(self) -> ApiResponse:
        return self.request("GET", "/v1/pipelines")

    def control_pipeline(self, pipeline: str, action: str) -> ApiResponse:
        return self.request("POST", f"/v1/pipelines/{_q(pipeline)}/{action}")

    def put_pipeline(self, pipeline: str, body: bytes, content_type: str) -> ApiResponse:
        return self.request("PUT", f"/v1/pipelines/{_q(pipeline)}", body,
                            {"Content-Type": content_type})

    def get_pipeline(self, pipeline: str, *, as_json: bool = False) -> ApiResponse:
        accept = "application/json" if as_json else "application/yaml"
        return self.request("GET", f"/v1/pipelines/{_q(pipeline)}", headers={"Accept": accept})

    def delete_pipeline(self, pipeline: str) -> ApiResponse:
        return self.request("DELETE", f"/v1/pipelines/{_q(pipeline)}")


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", errors="replace")
