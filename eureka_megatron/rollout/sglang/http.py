"""JSON over HTTP to one SGLang server, through a replaceable transport.

The default transport is `requests` (a fresh session per call, never a proxy). Tests swap in
an in-process one that drives SGLang's own FastAPI app (tests/sglang_api), so the same client
code is checked against SGLang's routes without a network server.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import requests

from eureka_megatron.rollout.engine import EngineDeadError

# (method, url, body, headers, timeout) -> (status, body); raises OSError when nobody answers
Transport = Callable[[str, str, "bytes | None", "dict[str, str]", float], "tuple[int, bytes]"]


class SGLangHTTPError(RuntimeError):
    """The server answered with an HTTP error status."""

    def __init__(self, method: str, url: str, status: int, body: str):
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:500]}")
        self.status, self.body = status, body


class SGLangRefused(RuntimeError):
    """A control request answered `success: false` (SGLang's message kept)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path} refused: {message[:500]}")
        self.path, self.message = path, message


def requests_transport(method: str, url: str, body: bytes | None, headers: dict[str, str],
                       timeout: float) -> tuple[int, bytes]:
    """requests' errors (refused, reset, timed out, closed mid-answer) are OSErrors."""
    with requests.Session() as session:
        session.trust_env = False  # no proxy or .netrc from the environment: the server is ours
        resp = session.request(method, url, data=body, headers=headers, timeout=timeout)
        return resp.status_code, resp.content


class SGLangHTTP:
    """Requests to one server: JSON in, JSON (or text) out, errors that say which."""

    def __init__(self, url: str, *, api_key: str | None = None,
                 transport: Transport | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.transport = transport or requests_transport

    def get(self, path: str, *, timeout: float) -> Any:
        return self.request("GET", path, None, timeout)

    def post(self, path: str, body: dict, *, timeout: float) -> Any:
        return self.request("POST", path, body, timeout)

    def checked(self, path: str, body: dict, *, timeout: float) -> Any:
        """POST a control request; `success: false` (with HTTP 200 or 400) is SGLangRefused."""
        try:
            out = self.post(path, body, timeout=timeout)
        except SGLangHTTPError as e:
            message = _message(e.body)
            if message is None:
                raise
            raise SGLangRefused(path, message) from None
        if isinstance(out, dict) and out.get("success") is False:
            raise SGLangRefused(path, str(out.get("message")))
        return out

    def request(self, method: str, path: str, body: dict | None, timeout: float) -> Any:
        url = self.url + path
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        try:
            status, raw = self.transport(method, url, data, headers, timeout)
        except OSError as e:  # refused, reset, timed out
            raise EngineDeadError(f"SGLang server at {self.url} did not answer {method} {path}: "
                                  f"{type(e).__name__}: {e}") from e
        text = raw.decode("utf-8", "replace")
        if status >= 400:
            raise SGLangHTTPError(method, url, status, text)
        try:
            return json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            return text


def _message(body: str) -> str | None:
    """SGLang's `{"success": false, "message": ...}` refusal inside an error answer, if it is one."""
    try:
        out = json.loads(body)
    except (json.JSONDecodeError, TypeError):
        return None
    if isinstance(out, dict) and out.get("success") is False:
        return str(out.get("message"))
    return None
