"""How ``hms`` and the HTTP servers word their answers (issue 12, point 4): tokens missing or
refused, routes that do not exist, the usage line, a wait's deadline, a step service's module
that cannot be imported. No broker needed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from hms_mgmt.cli import prog_name
from hms_mgmt.cli_format import relative, show
from hms_mgmt.worker.__main__ import load_target
from hms_mgmt.worker.probes import probe_app
from tests.conftest import ROOT, hms


@pytest.fixture
async def guarded_engine() -> AsyncIterator[str]:
    """A stand-in for the engine's API that refuses every request's token, as the engine does."""

    async def refuse(request: web.Request) -> web.Response:
        given = "Authorization" in request.headers
        message = "the token given does not match" if given else "this needs 'Authorization'"
        error = {"type": "Unauthorized", "message": message}
        return web.json_response({"error": error}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_a_missing_token_and_a_refused_one_are_told_apart(guarded_engine: str) -> None:
    env = {"HMS_ENGINE_URL": guarded_engine, "HMS_HTTP_TOKEN": ""}
    missing = await hms("workflow", "list", env=env)
    assert missing.returncode == 1
    assert (
        "no token given: the engine needs one for this (set HMS_HTTP_TOKEN, or pass --token)"
        in (missing.stderr)
    )
    wrong = await hms("--token", "guess", "workflow", "start", "grantApproval", env=env)
    assert wrong.returncode == 1
    assert "token refused: the token given (--token or HMS_HTTP_TOKEN) is not the engine's" in (
        wrong.stderr
    )
    assert "guess" not in wrong.stderr
    broken = await hms("workflow", "list", env={**env, "HMS_HTTP_TOKEN": "s3cret\n"})
    assert broken.returncode == 2 and "holds a newline" in broken.stderr
    assert "s3cret" not in broken.stderr and "Traceback" not in broken.stderr


async def test_a_step_service_answers_unknown_routes_in_json() -> None:
    app = probe_app(lambda: b"", lambda: {"serving": True})
    async with TestClient(TestServer(app)) as client:
        nowhere = await client.get("/nowhere")
        assert nowhere.status == 404 and nowhere.content_type == "application/json"
        assert (await nowhere.json())["error"] == {"type": "NotFound", "message": "Not Found"}
        wrong = await client.post("/healthz")
        assert wrong.status == 405 and "GET" in wrong.headers["Allow"]
        assert (await wrong.json())["error"]["type"] == "MethodNotAllowed"


def _help(*command: str) -> str:
    done = subprocess.run(
        [*command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[0]


def test_the_usage_line_follows_how_hms_was_invoked() -> None:
    script = Path(sys.executable).with_name("hms")
    assert _help(str(script), "engine") == "Usage: hms engine [OPTIONS]"
    assert _help(str(script), "worker") == "Usage: hms worker [OPTIONS] TARGET"
    assert _help(sys.executable, "-m", "hms_mgmt", "engine") == (
        "Usage: python -m hms_mgmt engine [OPTIONS]"
    )
    assert _help(sys.executable, "-m", "hms_mgmt.engine") == (
        "Usage: python -m hms_mgmt.engine [OPTIONS]"
    )
    assert prog_name("/usr/local/bin/hms") == "hms"
    assert prog_name("/x/hms_mgmt/__main__.py") == "python -m hms_mgmt"


def test_a_waits_deadline_is_a_utc_time_and_how_far_off_it_is() -> None:
    now = 1764100800.0  # 2025-11-25 20:00:00 UTC
    state: dict[str, Any] = {
        "workflow_id": "w",
        "name": "grantApproval",
        "status": "waiting",
        "created_at": now - 60,
        "updated_at": now - 30,
        "waiting_for": {"event": "inspectionReport", "until": now + 13 * 86400 + 23 * 3600 + 5},
        "input": {},
        "steps": [],
        "history": [{"at": now - 30, "kind": "waiting", "detail": {"until": now + 200}}],
    }
    text = show(state, history=True, now=now)
    assert (
        "waiting   for signal 'inspectionReport' until 2025-12-09 19:00:05.000Z (in 13d 23h)"
        in text
    )
    assert '"until": "2025-11-25 20:03:20.000Z"' in text  # the history's, too
    assert "1764" not in text  # no raw epoch anywhere
    assert relative(now + 200, now) == "in 3m 20s"
    assert relative(now - 5, now) == "5s ago"
    assert relative(1e308, now) == "" and relative("soon", now) == ""
    no_deadline = {**state, "waiting_for": {"event": "go", "until": None}}
    assert "waiting   for signal 'go'\n" in show(no_deadline, now=now)


@pytest.fixture
def fresh_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """sys.path without the repository (pytest puts it there), restored after the test."""
    kept = [p for p in sys.path if p and Path(p).resolve() != ROOT]
    monkeypatch.setattr(sys, "path", kept)


def test_a_step_service_module_is_imported_from_the_current_directory(
    fresh_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "examples" or m.startswith("examples.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(click.BadParameter) as outside:
        load_target("examples.grant_approval.service:mgmt")
    assert (
        f"no module named 'examples': modules are imported relative to the current directory, "
        f"{tmp_path}" in outside.value.message
    )
    (tmp_path / "needy.py").write_text("import no_such_dependency_xyz\n")
    with pytest.raises(click.BadParameter) as needy:
        load_target("needy:mgmt")
    assert "it imports 'no_such_dependency_xyz', which is not installed" in needy.value.message

    monkeypatch.chdir(ROOT)
    service = load_target("examples.grant_approval.service")  # the module's one init(...) object
    assert service is load_target("examples.grant_approval.service:mgmt")
    with pytest.raises(click.BadParameter, match=r"package 'examples\.grant_approval' has no"):
        load_target("examples.grant_approval.services")
    with pytest.raises(click.BadParameter, match="has no attribute 'nope'"):
        load_target("examples.grant_approval.service:nope")
    with pytest.raises(click.BadParameter, match=r"has no hms_mgmt\.init"):
        load_target("examples.grant_approval.workflow")


def test_hms_worker_outside_the_repository_names_the_missing_module(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hms_mgmt", "worker", "examples.grant_approval.service:mgmt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "no module named 'examples'" in done.stderr
    assert "imported relative to the current directory" in done.stderr
