"""The chaos suite's private RabbitMQ node and its report (printed at the end of the run)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import REPORTS, Case, Report
from tests.chaos.node import RabbitNode
from tests.conftest import IN_CI

REPORT_PATH = Path(
    os.environ.get("HMS_CHAOS_REPORT", Path(tempfile.gettempdir()) / "hms-chaos-report.json")
)


@pytest.fixture(scope="session")
def node() -> Iterator[RabbitNode]:
    if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
        message = "the chaos suite needs rabbitmq-server and root (to run a private node)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    rabbit = RabbitNode()
    rabbit.start()
    try:
        yield rabbit
    finally:
        rabbit.stop()


@pytest.fixture
def case(node: RabbitNode, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Case]:
    chaos_case = Case(node, tmp_path, request.node.name)
    try:
        yield chaos_case
    finally:
        chaos_case.close()


COLUMNS = (
    "case",
    "started",
    "succeeded",
    "compensated",
    "failed_by_design",
    "in_dlq",
    "lost",
    "duplicate_transitions",
    "extra_executions",
    "seconds",
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    write_report(terminalreporter, "chaos report", REPORTS, REPORT_PATH)


def write_report(
    terminalreporter: pytest.TerminalReporter, title: str, reports: list[Report], path: Path
) -> None:
    """The cases' table (nothing lost, nothing doubled) at the end of the run, and as JSON."""
    if not reports:
        return
    rows = [r.to_json() for r in reports]
    path.write_text(json.dumps(rows, indent=2))
    terminalreporter.section(title)
    terminalreporter.write_line("| " + " | ".join(COLUMNS) + " |")
    terminalreporter.write_line("|" + " --- |" * len(COLUMNS))
    for row in rows:
        terminalreporter.write_line("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    for row in rows:
        for note in row["notes"]:
            terminalreporter.write_line(f"  {row['case']}: {note}")
    terminalreporter.write_line(f"JSON: {path}")
