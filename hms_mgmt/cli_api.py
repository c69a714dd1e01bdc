"""The CLI's side of the engine's HTTP API: plain blocking requests (urllib), clear failures.

Every failure is a :class:`CliError` with the exit code it deserves: 1 when the
engine refused (unknown id, wrong state, bad request, no token), 3 when the
engine or its broker cannot be reached.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import click

from hms_mgmt.cli_format import printable

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


class CliError(click.ClickException):
    """The engine refused: a message for stderr, exit code 1. ``status`` and ``kind`` are the
    HTTP status and error type of the engine's answer, when it gave one."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str, *, status: int | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.kind = status, kind


class Unreachable(CliError):
    """The engine, or the engine's broker, cannot be reached: exit code 3."""

    exit_code = EXIT_UNREACHABLE


class NotConfigured(CliError):
    """Nothing says where the engine is, or the URL is malformed: exit code 2."""

    exit_code = EXIT_USAGE


class StoreUnusable(CliError):
    """The store (or a backup's destination) cannot be opened or written: exit code 2, as the
    engine's for the same store; the message names the path."""

    exit_code = EXIT_USAGE


class EngineHttp:
    def __init__(self, url: str | None, token: str | None, timeout: float) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout

    def _base(self) -> str:
        if self.url is None:
            raise NotConfigured(
                "no engine to talk to: pass --engine-url, or set HMS_ENGINE_URL or HMS_HTTP_PORT "
                "(the engine serves its API when started with --http-port)"
            )
        if not self.url.startswith(("http://", "https://")):
            raise NotConfigured(f"engine URL {self.url!r} must start with http:// or https://")
        return self.url.rstrip("/")

    def _open(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        url = self._base() + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        if self.token:  # reads need it too beyond loopback
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if method == "POST":
            data = json.dumps({} if body is None else body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise _refusal(exc, token_given=self.token is not None) from None
        except ValueError:  # http.client refuses a header with a newline (and would echo it)
            raise NotConfigured(
                "the token (--token or HMS_HTTP_TOKEN) holds a newline or another control "
                "character: give the token alone"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, socket.timeout | TimeoutError):
                reason = f"no answer within {timeout or self.timeout:g}s"
            raise Unreachable(
                f"the engine is unreachable at {self._base()}: {reason} (is 'hms engine "
                "--http-port PORT' running, and does HMS_ENGINE_URL point at it?)"
            ) from None

    def get(self, path: str, **query: Any) -> Any:
        with self._open("GET", path, query=query) as response:
            return _loads(response.read())

    def post(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """POST; ``timeout`` for a request the engine holds longer than usual (a wait)."""
        with self._open("POST", path, body, timeout=timeout) as response:
            return _loads(response.read())

    def stream(self, path: str, body: Any = None) -> Iterator[dict[str, Any]]:
        """POST, then yield the JSON lines of the answer as they arrive."""
        with self._open("POST", path, body) as response:
            for line in response:
                if line.strip():
                    yield _loads(line)


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # not JSON, over 4300 digits, too deep
        raise CliError(f"the engine's answer is not JSON this command can read: {exc}") from None


def _refusal(exc: urllib.error.HTTPError, *, token_given: bool) -> CliError:
    kind = None
    try:
        error = json.loads(exc.read()).get("error") or {}
        message = str(error.get("message") or exc.reason)
        kind = str(error["type"]) if error.get("type") else None
    except (ValueError, AttributeError, OSError):
        message = f"HTTP {exc.code} {exc.reason}"
    if exc.code == 401:  # worded for hms users: which of the two it is, and what to do
        message = (
            "token refused: the token given (--token or HMS_HTTP_TOKEN) is not the engine's "
            "HMS_HTTP_TOKEN"
            if token_given
            else "no token given: the engine needs one for this (set HMS_HTTP_TOKEN, or pass "
            "--token)"
        )
    message = printable(message)
    if exc.code in (502, 503, 504):
        return Unreachable(message, status=exc.code, kind=kind)
    return CliError(message, status=exc.code, kind=kind)


def quote(segment: str) -> str:
    """One path segment (an id, a queue name), escaped."""
    return urllib.parse.quote(segment, safe="")
