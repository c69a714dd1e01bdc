"""The cluster suite's 3-node RabbitMQ cluster (booted once per module), a case per test (its
own vhost and PostgreSQL database), and its report, in the chaos suite's table."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.conftest import write_report
from tests.cluster.harness import CLUSTER_REPORTS, ClusterCase
from tests.cluster.node import RabbitCluster
from tests.conftest import IN_CI

REPORT_PATH = Path(
    os.environ.get("HMS_CLUSTER_REPORT", Path(tempfile.gettempdir()) / "hms-cluster-report.json")
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
        message = "the cluster suite needs rabbitmq-server and root (to run private nodes)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    nodes = RabbitCluster()
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def case(
    postgres_url: str, cluster: RabbitCluster, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ClusterCase]:
    """``postgres_url`` first: the case's processes stop before its database is dropped."""
    for node in cluster.nodes:  # a case before may have left one down
        if node.pid() is None:
            node.launch()
            node.await_up()
    cluster_case = ClusterCase(cluster, tmp_path, request.node.name, postgres_url)
    try:
        yield cluster_case
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:  # what the broker saw, for the post-mortem
            (tmp_path / "broker-state.txt").write_text(cluster_case.broker_state())
    finally:
        cluster_case.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    write_report(terminalreporter, "cluster report", CLUSTER_REPORTS, REPORT_PATH)
