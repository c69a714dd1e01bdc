"""The dashboard in a real browser (Debian's Chromium, driven by Playwright) against a real
engine and step service on the broker, used as a person would: no reloads, clicks only."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import hms_mgmt
from hms_mgmt import Parallel, Step
from tests.conftest import IN_CI, Processes, http_get, wait_until
from tests.test_operators import Ops, start_ops

pytestmark = pytest.mark.broker

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(
    os.environ.get("HMS_SCREENSHOTS", Path(tempfile.gettempdir()) / "hms-dashboard-screenshots")
)

try:
    from playwright.async_api import Page, async_playwright, expect
except ImportError:  # pragma: no cover - without the dev extra
    async_playwright = None


def _missing(why: str) -> None:
    if IN_CI:
        pytest.fail(f"the dashboard's browser tests need {why} (CI=true: failing, not skipping)")
    pytest.skip(f"needs {why}")


@pytest.fixture
def chromium() -> str:
    if async_playwright is None:
        _missing("playwright (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        _missing(f"{CHROMIUM} (apt-get install -y chromium)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    return CHROMIUM


@pytest.fixture
async def page(chromium: str) -> AsyncIterator[Page]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        context = await browser.new_context(viewport={"width": 1366, "height": 900})
        opened = await context.new_page()
        opened.set_default_timeout(15_000)
        errors: list[str] = []
        opened.on("pageerror", lambda exc: errors.append(str(exc)))
        opened.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        try:
            yield opened
        finally:
            await browser.close()
        assert errors == [], f"the page's script failed: {errors}"


@pytest.fixture
async def ops(processes: Processes, vhost: str, store_url: str) -> AsyncIterator[Ops]:
    async for running in start_ops(processes, vhost, store_url):
        yield running


async def shot(page: Page, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


async def live(page: Page) -> None:
    """The page's event stream is connected (so what follows is seen without a reload)."""
    await expect(page.locator("#live")).to_have_text("live")


async def test_overview_live_table_search_steps_and_script_payloads(
    ops: Ops, client: hms_mgmt.Management, page: Page
) -> None:
    await page.goto(f"{ops.engine_url}/")
    await expect(page.locator("h1")).to_have_text("Overview")
    await expect(page.locator('.tile[data-status="total"] .n')).to_have_text("0")
    await live(page)
    await shot(page, "overview-empty")

    # The table, open before the workflow starts: it shows up without a reload, within 2 s.
    await page.click("header >> text=Workflows")
    await expect(page).to_have_url(f"{ops.engine_url}/workflows")
    await expect(page.locator("#workflows tbody")).to_contain_text("no workflow matches")
    await live(page)
    started = await client.start(
        "grantApproval",
        {"application_id": "A-17", "fail_once": "creditCheck"},
        attributes={"application_id": "A-17"},
    )
    since = time.monotonic()
    row = page.locator(f'#workflows tr[data-id="{started.workflow_id}"]')
    await expect(row).to_be_visible(timeout=2000)
    appeared = time.monotonic() - since
    print(f"a started workflow appeared in the table {appeared * 1000:.0f} ms after start returned")
    assert appeared < 2.0
    await expect(row.locator(".status")).to_have_text("succeeded", timeout=15_000)

    # Others, to search among; one with a <script> (and an <img onerror>) in its payload.
    hostile = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
    others = [
        await client.start(
            "grantApproval", {"application_id": f"B-{n}"}, attributes={"application_id": f"B-{n}"}
        )
        for n in range(2)
    ]
    evil = await client.start("grantApproval", {"application_id": "X-1", "note": hostile})
    for other in [*others, evil]:
        await client.wait(other.workflow_id, timeout=30)
    await expect(page.locator("#workflows tbody tr")).to_have_count(4)
    await shot(page, "workflows")

    # Pages by keyset: two and two, each once.
    await page.goto(f"{ops.engine_url}/workflows?limit=2")
    rows = page.locator("#workflows tbody tr")
    await expect(rows).to_have_count(2)
    first = [await r.get_attribute("data-id") for r in await rows.all()]
    await page.click("#older")
    await expect(page.locator("#newest")).to_be_visible()
    await expect(rows).to_have_count(2)
    second = [await r.get_attribute("data-id") for r in await rows.all()]
    ids = {started.workflow_id, evil.workflow_id, *(o.workflow_id for o in others)}
    assert set(first + second) == ids and len(first + second) == 4

    # A time range: created in the last 15 minutes (a relative link), or from a time on.
    await page.goto(f"{ops.engine_url}/workflows")
    await page.select_option('#filters select[name="ago"]', "15m")
    await page.click('#filters button[type="submit"]')
    await expect(page).to_have_url(f"{ops.engine_url}/workflows?since=15m")
    await expect(page.locator("#workflows tbody tr")).to_have_count(4)
    await page.fill('#filters input[name="from"]', "2999-01-01T00:00:00")
    await page.click('#filters button[type="submit"]')
    await expect(page.locator("#workflows tbody")).to_contain_text("no workflow matches")
    assert "since=32472" in page.url  # 2999-01-01 as seconds since the epoch (any time zone)
    await page.fill('#filters input[name="from"]', "")
    await page.fill('#filters input[name="to"]', "2999-01-01T00:00:00")
    await page.select_option('#filters select[name="ago"]', "")
    await page.click('#filters button[type="submit"]')
    await expect(page.locator("#workflows tbody tr")).to_have_count(4)
    await page.click("header >> text=Workflows")  # no filters

    # Search by business key: exactly one, and the URL says so (linkable).
    await page.fill('#filters input[name="attr"]', "application_id=A-17")
    await page.click('#filters button[type="submit"]')
    await expect(page).to_have_url(f"{ops.engine_url}/workflows?attr.application_id=A-17")
    await expect(page.locator("#workflows tbody tr")).to_have_count(1)
    await expect(row).to_be_visible()
    await page.select_option('#filters select[name="status"]', "failed")
    await page.click('#filters button[type="submit"]')
    await expect(page.locator("#workflows tbody")).to_contain_text("no workflow matches")

    # One workflow: each step with its attempts, the failed one's error and traceback.
    await page.goto(f"{ops.engine_url}/workflows?attr.application_id=A-17")
    await page.click(f"text={started.workflow_id}")
    await expect(page).to_have_url(f"{ops.engine_url}/workflows/{started.workflow_id}")
    steps = page.locator("#steps tbody tr")
    await expect(steps).to_have_count(5)
    seen = [
        (await r.get_attribute("data-step"), await r.get_attribute("data-attempt"))
        for r in await steps.all()
    ]
    assert seen == [
        ("validateApp", "1"),
        ("creditCheck", "1"),
        ("creditCheck", "2"),
        ("scheduleInspection", "1"),
        ("finalize", "1"),
    ]
    failed = steps.nth(1)
    await expect(failed.locator(".status")).to_have_text("failed")
    await expect(failed).to_contain_text("RuntimeError: creditCheck is unavailable (attempt 1)")
    await expect(failed.locator("details pre")).to_contain_text("Traceback")
    await expect(page.locator('[data-payload="output"]')).to_contain_text('"creditCheck": 2')
    await expect(page.locator("#history")).to_contain_text("workflow_started")
    await expect(page.locator('[data-fact="business keys"]')).to_have_text("application_id=A-17")
    await expect(page.locator('[data-fact="priority"]')).to_have_text("3")  # the default
    await shot(page, "workflow")

    # A payload with <script> is shown as text, and nothing in it ran.
    await page.goto(f"{ops.engine_url}/workflows/{evil.workflow_id}")
    shown = page.locator('[data-payload="input"]')
    await expect(shown).to_contain_text("<script>window.__pwned = 1</script>")
    await expect(shown).to_contain_text('onerror=\\"window.__pwned = 2\\"')
    assert await page.locator("#main script, #main img").count() == 0
    assert await page.evaluate("window.__pwned") is None
    await shot(page, "workflow-script-payload")

    # The overview counts it all.
    await page.click("header >> text=Overview")
    await expect(page.locator('.tile[data-status="succeeded"] .n')).to_have_text("4")
    await expect(page.locator('#rates [data-kind="started"]')).to_contain_text(
        "started: 4 in the hour"
    )
    await expect(
        page.locator('#slowest tr[data-step="grantApproval.creditCheck"]')
    ).to_contain_text("grantApproval")
    await shot(page, "overview")


async def test_retry_button_and_a_dead_letter_replayed_from_its_page(
    ops: Ops, client: hms_mgmt.Management, page: Page, tmp_path: Path
) -> None:
    # What a workflow waits for, and until when: a running step and its deadline...
    release = tmp_path / "release"
    held = await client.start("held", {"release": str(release)})
    await page.goto(f"{ops.engine_url}/workflows/{held.workflow_id}")
    waiting = page.locator('[data-fact="waiting for"]')
    await expect(waiting).to_contain_text("step hold (attempt 1) running since", timeout=10_000)
    await expect(waiting).to_contain_text(", deadline ")
    await expect(waiting).to_contain_text(" min)")  # 300 s from its start: "(in 5.0 min)"
    await shot(page, "workflow-running")
    release.touch()
    await expect(page.locator('[data-fact="status"]')).to_have_text("succeeded", timeout=15_000)
    await expect(waiting).to_have_text("-")
    # ...and a retry's backoff (2 s, then 4 s, before attempts 2 and 3).
    stumbling = await client.start("backoff", {"always_fail": True})
    await page.goto(f"{ops.engine_url}/workflows/{stumbling.workflow_id}")
    await expect(waiting).to_contain_text("backoff: attempt 2 of stumble at ", timeout=10_000)

    unlock = tmp_path / "unlock"
    gated = await client.start("gated", {"unlock": str(unlock)})
    assert (await client.wait(gated.workflow_id, timeout=30)).status == "failed"
    await page.goto(f"{ops.engine_url}/workflows/{gated.workflow_id}")
    await expect(page.locator('[data-fact="status"]')).to_have_text("failed")
    await live(page)
    unlock.touch()
    await page.click("#retry")
    await expect(page.locator("#notice")).to_contain_text('"dead_letters_settled":1')
    # Live: the page follows it to the end without a reload.
    await expect(page.locator('[data-fact="status"]')).to_have_text("succeeded", timeout=15_000)
    await expect(page.locator("#steps tbody tr")).to_have_count(3)

    # A dead letter, replayed from the dead letters' page: its workflow runs again.
    doomed = await client.start("doomed", {"application_id": "D-1"})
    assert (await client.wait(doomed.workflow_id, timeout=30)).status == "failed"
    await page.click("header >> text=Overview")
    depth = page.locator('#dlq-depth tr[data-queue="doomed.explode.dlq"]')
    await expect(depth).to_contain_text("1", timeout=10_000)
    await page.click("header >> text=Dead letters")
    letter = page.locator('[data-letters="doomed.explode.dlq"] tbody tr')
    await expect(letter).to_have_count(1, timeout=10_000)
    await expect(letter).to_contain_text("attempts exhausted")
    await expect(letter).to_contain_text("credit bureau down")
    await expect(letter).to_contain_text(doomed.workflow_id)
    assert (await letter.locator("td").nth(7).text_content() or "").endswith("s ago")  # its age
    await shot(page, "dlq")
    await letter.locator('button[data-action="replay"]').click()
    await expect(page.locator("#notice")).to_contain_text('"outcome":"resumed"')
    state = await wait_until(
        lambda: _state(ops, doomed.workflow_id, attempts=4), timeout=30, what="the replayed run"
    )
    assert state["status"] == "failed"  # it fails again, as it always does
    queue = page.locator('#queues tr[data-queue="doomed.explode.dlq"]')
    await expect(queue.locator("td").nth(1)).to_have_text("1", timeout=10_000)
    await queue.locator('button[data-action="purge"]').click()
    await expect(queue.locator("td").nth(1)).to_have_text("0")


async def test_pause_resume_and_reset_buttons(
    ops: Ops, client: hms_mgmt.Management, page: Page, tmp_path: Path
) -> None:
    note = str(tmp_path / "runs.txt")
    started = await client.start("noted", {"note": note, "delay": 600})

    async def scheduled() -> bool:
        state = await client.status(started.workflow_id)
        return state.steps[-1].status == "scheduled"

    await wait_until(scheduled, timeout=30, what="its second step scheduled")
    await page.goto(f"{ops.engine_url}/workflows/{started.workflow_id}")
    await expect(page.locator('[data-fact="status"]')).to_have_text("running")
    await live(page)
    await page.fill('input[name="pause-reason"]', "audit")
    await page.click("#pause")
    await expect(page.locator('[data-fact="status"]')).to_have_text("paused")
    await expect(page.locator('[data-fact="paused"]')).to_contain_text("(audit)")
    await expect(page.locator('[data-fact="paused"]')).to_contain_text("run timer frozen")
    await shot(page, "workflow-paused")
    await page.click("#resume")
    await expect(page.locator('[data-fact="status"]')).to_have_text("running")
    await page.fill('input[name="to-step"]', "nowhere")
    await page.click("#reset")
    await expect(page.locator("#notice")).to_contain_text("has no step 'nowhere'")
    await page.fill('input[name="to-step"]', "first")
    await page.fill('textarea[name="reset-data"]', json.dumps({"note": note, "delay": 600, "n": 2}))
    await page.click("#reset")
    await expect(page.locator("#notice")).to_contain_text('"to_step":"first"')
    # first again (a new visit, with the new input), then second scheduled again
    await expect(page.locator("#steps tbody tr")).to_have_count(4, timeout=15_000)
    state = await client.status(started.workflow_id)
    assert [(s.step, s.status) for s in state.steps] == [
        ("first", "succeeded"),
        ("second", "cancelled"),
        ("first", "succeeded"),
        ("second", "scheduled"),
    ]
    assert state.steps[2].input["n"] == 2


async def test_pause_and_resume_a_workflow_type_s_step_from_its_page(
    ops: Ops, client: hms_mgmt.Management, page: Page, tmp_path: Path
) -> None:
    note = str(tmp_path / "runs.txt")
    warm = await client.start("noted", {"note": note})  # the type is defined
    assert (await client.wait(warm.workflow_id, timeout=30)).status == "succeeded"
    await page.goto(f"{ops.engine_url}/")
    await page.click('header nav a[href="/types"]')
    await expect(page).to_have_url(f"{ops.engine_url}/types")
    row = page.locator('#types tr[data-type="noted"]')
    await expect(row.locator("[data-paused]")).to_have_text("-")
    # Steps as they run: a group bracketed, a compensation beside what it undoes.
    client.define_workflow(
        "outlined", [Parallel("a", "b"), Step("c", compensate="undoC"), "d"], on_error="e"
    )

    async def outlined_known() -> bool:
        return '"outlined"' in (await http_get(f"{ops.engine_url}/api/definitions"))[1]

    await wait_until(outlined_known, timeout=10, what="the outlined definition")
    await page.reload()
    await expect(page.locator('#types tr[data-type="outlined"] [data-steps]')).to_have_text(
        "[a | b] > c (undo undoC) > d"
    )
    await live(page)
    await row.locator('select[name="type-step"]').select_option("second")
    await row.locator('input[name="type-reason"]').fill("bureau down")
    await row.locator('[data-action="pause-type"]').click()
    await expect(row.locator("[data-paused]")).to_contain_text("step second since")
    await expect(row.locator("[data-paused]")).to_contain_text("(bureau down)")
    await shot(page, "types-paused")

    started = await client.start("noted", {"note": note})

    async def held() -> bool:  # first ran; second is held, the workflow paused by its type
        state = await client.status(started.workflow_id)
        return state.status == "paused" and [s.step for s in state.steps] == ["first", "second"]

    await wait_until(held, timeout=30, what="second held by the type pause")
    await row.locator('[data-action="pause-type"]').click()  # again: refused, and says why
    await expect(page.locator("#notice")).to_contain_text("noted.second is already paused")
    await row.locator('[data-action="resume-type"]').click()
    await expect(page.locator("#notice")).to_contain_text('"released":1')
    await expect(row.locator("[data-paused]")).to_have_text("-")
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "succeeded"


async def _state(ops: Ops, workflow_id: str, attempts: int) -> dict[str, Any] | None:
    status, body = await http_get(f"{ops.engine_url}/api/workflows/{workflow_id}")
    state: dict[str, Any] = json.loads(body)
    done = status == 200 and state["status"] == "failed" and len(state["steps"]) == attempts
    return state if done else None


async def test_beyond_loopback_the_page_needs_the_token(
    processes: Processes, vhost: str, store_url: str, client: hms_mgmt.Management, page: Page
) -> None:
    async for ops in start_ops(
        processes, vhost, store_url, HMS_HTTP_HOST="0.0.0.0", HMS_HTTP_TOKEN="s3cret"
    ):
        slow = await client.start("slow", {"seconds": 30})
        running = functools.partial(_running, client, slow.workflow_id)
        await wait_until(running, timeout=10, what="the slow workflow running")
        await page.goto(f"{ops.engine_url}/workflows/{slow.workflow_id}")
        await expect(page.locator("#facts")).to_contain_text("401 Unauthorized")
        await expect(page.locator("#live")).to_have_text("offline")
        await page.fill("#token", "guess")
        await page.click("#token-form button")
        await page.click("#cancel")
        await expect(page.locator("#notice")).to_contain_text("cancel refused: 401 Unauthorized")
        assert await running()
        await page.fill("#token", "s3cret")
        await page.click("#token-form button")
        await expect(page.locator('[data-fact="status"]')).to_have_text("running")
        await live(page)
        await page.click("#cancel")
        await expect(page.locator('[data-fact="status"]')).to_have_text("cancelled")


async def _running(client: hms_mgmt.Management, workflow_id: str) -> bool:
    return str((await client.status(workflow_id)).status) == "running"


async def test_a_fan_out_shows_its_branches(
    ops: Ops, client: hms_mgmt.Management, page: Page, tmp_path: Path
) -> None:
    started = await client.start("fanned", {"dir": str(tmp_path), "items": 3})
    assert (await client.wait(started.workflow_id, timeout=30)).status == "succeeded"
    await page.goto(f"{ops.engine_url}/workflows/{started.workflow_id}")
    await expect(page.locator('[data-fact="branches"]')).to_have_text(
        "3 from split, join join (joined): 3 succeeded"
    )
    await shot(page, "workflow-branches")
