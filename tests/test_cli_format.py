"""The CLI prints whatever the engine stored without crashing, and never passes control
characters to the terminal raw."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hms_mgmt.bounds import parse_time
from hms_mgmt.cli_format import (
    ago,
    cell,
    changes,
    printable,
    show,
    steps_outline,
    table,
    took,
    when,
)
from tests.conftest import hms

RAW = ("\x1b", "\x07", "\x00", "\r", "\x9b")  # ESC, BEL, NUL, CR, CSI


def crafted_state() -> dict[str, Any]:
    return {
        "workflow_id": "line\nbreak\x1b[31m",
        "name": "evil\x1b]0;title\x07",
        "status": "failed",
        "created_at": 1e308,
        "updated_at": -1e308,
        "scheduled_at": 1e300,
        "current_step": "s\r\n",
        "waiting_for": {"event": "e\x1b", "until": 1e308},
        "trace_id": "t\x00",
        "input": {"k": "v\nw"},
        "output": "o\x1b[2J",
        "error": {
            "type": "Boom\n",
            "message": "m\x1b[31m",
            "step": "s\n",
            "attempts": 2,
            "reason": "r\x07",
        },
        "steps": [
            {
                "seq": 1,
                "step": "a\nb",
                "attempt": 1,
                "status": "failed\x9b",
                "created_at": 0,
                "started_at": 1e308,
                "finished_at": math.inf,
                "error": {"type": "T", "message": "x\ny\x1b"},
            }
        ],
        "history": [{"at": 1e308, "kind": "k\x1b", "detail": {"d": "\n"}}],
    }


def no_raw_control_characters(text: str, lines: int | None = None) -> None:
    for char in RAW:
        assert char not in text, (char, text)
    if lines is not None:
        assert len(text.splitlines()) == lines, text


def test_control_characters_are_escaped() -> None:
    assert printable("plain text, é") == "plain text, é"
    assert printable("a\nb\tc\rd\x1b[31m\x00\x9b\u2028") == r"a\nb\tc\rd\x1b[31m\x00\x9b\u2028"
    assert cell("line\nbreak\x1b[31m") == r"line\nbreak\x1b[31m"
    assert cell({"k": "v\n"}) == '{"k": "v\\n"}'
    assert cell("\x1b" * 100, width=20) == "\\x1b" * 4 + "\\..."
    assert len(cell("\x1b" * 100, width=20)) == 20
    rows = table([{"id": "a\nb", "error": "\x1b[2J"}], ["id", "error"])
    no_raw_control_characters(rows, lines=2)


def test_timestamps_that_are_no_date_print_as_the_raw_number() -> None:
    assert when(1764100800.5) == "2025-11-25 20:00:00.500Z"
    assert when(1e308) == "1e+308"
    assert when(-1e308, date=False) == "-1e+308"
    assert when(math.nan) == "NaN"
    assert when(math.inf) == "Infinity"
    assert when(10**30) == str(10**30)
    assert when("soon\n") == r"soon\n"  # type: ignore[arg-type]
    assert when(None) == "-"
    assert took(0, 1e308) == "1e+308 s"
    assert took(1e308, math.inf) == "inf s"
    assert took(-1e308, 1e308) == "inf s"
    assert took("a", 1) == "-"  # type: ignore[arg-type]
    assert took(1.0, 1.5) == "500.0 ms"


def test_a_crafted_workflow_shows_without_crashing_or_raw_control_characters() -> None:
    state = crafted_state()
    text = show(state, history=True)
    no_raw_control_characters(text, lines=19)
    assert r"workflow  line\nbreak\x1b[31m" in text
    assert "created   1e+308" in text and "updated   -1e+308" in text
    assert r"at step s\n after 2 attempt(s) (r\x07)" in text
    assert r"a\nb" in text and r"x\ny\x1b" in text and r"k\x1b" in text
    lines = changes(None, state)
    assert lines and all("\n" not in line for line in lines)
    no_raw_control_characters("\n".join(lines))
    odd = {**state, "error": "just text\n", "waiting_for": "e\n", "steps": []}
    no_raw_control_characters(show(odd), lines=15)


@pytest.fixture
async def crafted_engine() -> AsyncIterator[str]:
    """A tiny stand-in for the engine's API that answers with crafted values."""
    state = crafted_state()

    async def one(request: web.Request) -> web.Response:
        if request.match_info["id"] == "missing":
            error = {"type": "WorkflowNotFoundError", "message": "no workflow \x1b[31mred\n"}
            return web.json_response({"error": error}, status=404)
        return web.json_response(state)

    async def many(_request: web.Request) -> web.Response:
        return web.json_response(
            [
                {
                    key: state[key]
                    for key in ("workflow_id", "name", "status", "created_at", "updated_at")
                }
                | {"error": state["error"]}
            ]
        )

    async def cancel(_request: web.Request) -> web.Response:
        return web.json_response({"workflow_id": "x\n\x1b[2J", "status": "cancelled\x07"})

    app = web.Application()
    app.router.add_get("/api/workflows/{id}", one)
    app.router.add_get("/api/workflows", many)
    app.router.add_post("/api/workflows/{id}/cancel", cancel)
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_the_cli_prints_crafted_answers_escaped(crafted_engine: str) -> None:
    env = {"HMS_ENGINE_URL": crafted_engine}
    shown = await hms("workflow", "show", "wf-1", "--history", env=env)
    assert shown.returncode == 0, shown.stderr
    no_raw_control_characters(shown.stdout, lines=19)
    assert r"line\nbreak\x1b[31m" in shown.stdout and "1e+308" in shown.stdout

    listed = await hms("workflow", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    no_raw_control_characters(listed.stdout, lines=2)
    assert r"line\nbreak\x1b[31m" in listed.stdout and "-1e+308" in listed.stdout

    cancelled = await hms("workflow", "cancel", "wf-1", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout == "x\\n\\x1b[2J: cancelled\\x07\n"

    missing = await hms("workflow", "show", "missing", env=env)
    assert missing.returncode == 1
    no_raw_control_characters(missing.stderr)
    assert r"no workflow \x1b[31mred\n" in missing.stderr


def test_times_for_list_filters_and_ages_for_people() -> None:
    now = 1_796_194_800.0  # 2026-12-02T07:00:00Z
    assert parse_time("15m", now=now) == now - 900
    assert parse_time("7d", now=now) == now - 7 * 86400
    assert parse_time("1.5h", now=now) == now - 5400
    assert parse_time(" 1796194800 ") == now
    assert parse_time("2026-12-02T07:00:00Z") == now
    assert parse_time("2026-12-02T07:00:00") == now  # no offset: UTC
    assert parse_time("2026-12-02T08:00:00+01:00") == now
    for text in ("", "yesterday", "-1", "nan", "inf", "15 m", "1w", "9" * 41, "2026-13-01"):
        with pytest.raises(ValueError, match="is not a time: give seconds since the epoch"):
            parse_time(text)
    assert [ago(now - s, now) for s in (0, 59, 60, 7200, 3 * 86400)] == [
        "0s",
        "59s",
        "1m",
        "2h",
        "3d",
    ]
    assert ago(None, now) == "-" and ago(math.inf, now) == "-" and ago(True, now) == "-"


def test_definitions_outline_their_parallel_groups_and_compensations() -> None:
    """``hms definitions`` shows a compensation beside the step it undoes and a Parallel group
    bracketed, not as ordered steps after the last one (``s1 > s2 > u2 > u1`` read as a
    sequence that runs u2 after s2)."""
    from hms_mgmt.definitions import Parallel, Step, WorkflowDefinition

    grant = WorkflowDefinition.build(
        "grant",
        [
            "validate",
            Parallel(Step("credit", compensate="release"), "background"),
            Step("inspect", compensate="cancelInspection"),
            "finalize",
        ],
        on_error="notify",
    )
    assert steps_outline(grant.to_json(), grant.step_names) == (
        "validate > [credit (undo release) | background] > inspect (undo cancelInspection)"
        " > finalize"
    )
    assert steps_outline(None, ["a", "b"]) == "a > b"  # no definition: the names as before
    assert steps_outline({"steps": "x"}, None) == ""
