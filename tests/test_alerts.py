"""The Prometheus rules and the Grafana dashboard in deploy/: promtool accepts and tests the
rules, every alert is tested firing and silent, and every metric they query is one the
engine or a step service really exports (scraped from their /metrics on the memory bus)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

import hms_mgmt
from bus_adapters import open_bus
from hms_mgmt.engine.api import EngineApi, engine_metrics
from hms_mgmt.engine.engine import Engine
from hms_mgmt.loopwatch import LoopMonitor
from hms_mgmt.settings import Settings
from hms_mgmt.store import open_store
from hms_mgmt.worker.probes import probe_app, worker_metrics
from tests.conftest import IN_CI, ROOT

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "hms-mgmt.json"
FROM_PROMETHEUS = {"up"}  # what Prometheus itself records for every target


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool; without it, fail under CI and skip elsewhere."""
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not found (Debian's prometheus package; .ci/run installs it)"
        if IN_CI or os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run(
        [found, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


# -- promtool --------------------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    tested = promtool("test", "rules", RULE_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout and "FAILED" not in tested.stdout


def test_promtool_accepts_the_example_prometheus_config() -> None:
    checked = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs >= {"hms-engine", "hms-steps"}  # the jobs the rules name


# -- the rules' shape ------------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def test_every_alert_has_a_severity_and_says_what_to_do() -> None:
    assert len(alerts()) >= 8
    for name, alert in alerts().items():
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), name
        assert annotations["runbook"].strip(), name
    for name in ("HmsWorkflowFailureRateHigh", "HmsDeadLettersGrowing", "HmsTimersOverdue"):
        assert "`hms " in alerts()[name]["annotations"]["runbook"], name  # a command to run


def test_every_alert_is_tested_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert set(alerts()) <= firing, set(alerts()) - firing
    assert set(alerts()) <= silent, set(alerts()) - silent


# -- every metric queried is exported ----------------------------------------------------------

KEYWORDS = {
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
    "group_left",
    "group_right",
}


def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names a PromQL expression selects.

    Strings, label matchers, ranges, grouping clauses, numbers and Grafana's variables are
    taken out first; what is left and is neither a function nor a keyword is a name.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "''", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)
    expr = re.sub(r"(?<![\w:])\d[\w.]*", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function
        if match.group().lower() not in KEYWORDS:
            names.add(match.group())
    return names


def test_metric_names_are_read_out_of_promql() -> None:
    expr = (
        'sum by (workflow, le) (rate(hms_x_bucket{status="a b", le!="1"}[$__rate_interval]))'
        " / ignoring(le) group_left hms_y offset 1d > 0.5 and on (workflow) absent(up) or"
        " histogram_quantile(0.95, a:b:c) * 1e3 unless hms_z{} > bool 2"
    )
    assert metric_names(expr) == {"hms_x_bucket", "hms_y", "up", "a:b:c", "hms_z"}


def sample_names(text: str) -> set[str]:
    """Every sample name a /metrics text can have, from its families (labelled families
    with no series yet included): counters' ``_total``, histograms' ``_bucket`` and so on."""
    names = set()
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["_sum", "_count", ""],
        }.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


@pytest.fixture(scope="module")
def exported() -> Iterator[set[str]]:
    """The names of the engine's and a step service's /metrics, scraped from both."""
    import tempfile
    import uuid

    from bus_adapters.memory import reset_brokers

    async def scrape_both(store_url: str, memory_url: str) -> set[str]:
        engine = Engine(open_bus(memory_url), open_store(store_url))
        running = asyncio.ensure_future(engine.run())
        await asyncio.wait_for(engine.ready.wait(), 10)
        api = EngineApi(engine, engine_metrics(engine, LoopMonitor("engine")))
        try:
            async with TestClient(TestServer(api.app())) as http:
                engine_text = await (await http.get("/metrics")).text()
        finally:
            engine.stop()
            await running
        service = hms_mgmt.init(service_name="t", broker_url=memory_url)
        metrics = worker_metrics(service, Settings.from_env({}))
        app = probe_app(metrics.render, service.readiness, service.loop_monitor)
        async with TestClient(TestServer(app)) as http:
            worker_text = await (await http.get("/metrics")).text()
        return sample_names(engine_text) | sample_names(worker_text)

    with tempfile.TemporaryDirectory() as tmp:
        memory_url = f"memory://alerts-{uuid.uuid4().hex[:8]}"
        try:
            yield asyncio.run(scrape_both(f"sqlite:///{Path(tmp) / 'hms.db'}", memory_url))
        finally:
            reset_brokers()


def test_the_scrape_has_the_metrics_alerts_need(exported: set[str]) -> None:
    assert {
        "hms_engine_ready",
        "hms_outbox_oldest_age_seconds",
        "hms_outbox_backlog",
        "hms_timers_overdue_seconds",
        "hms_workflows_finished_total",
        "hms_step_duration_seconds_bucket",
        "hms_worker_step_duration_seconds_bucket",
        "hms_event_loop_blocks_total",
    } <= exported


def test_the_rules_query_only_exported_metrics(exported: set[str]) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        names = metric_names(rule["expr"])
        assert names, rule
        unknown = names - exported - recorded - FROM_PROMETHEUS
        assert not unknown, f"{rule.get('alert') or rule.get('record')} queries {unknown}"


# -- the Grafana dashboard -------------------------------------------------------------------


def dashboard_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner, target["expr"]


def test_the_dashboard_queries_only_exported_metrics(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    targets = list(dashboard_targets(dashboard))
    assert len(targets) >= 10
    for panel, expr in targets:
        names = metric_names(expr)
        assert names, (panel["title"], expr)
        unknown = names - exported - FROM_PROMETHEUS
        assert not unknown, f"panel {panel['title']!r} queries {unknown}"


def test_the_dashboard_takes_its_datasource_from_a_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("started", "in progress", "p95", "dead letters", "outbox", "event loop"):
        assert topic in titles, topic


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel's query, as a recording rule ($__rate_interval made 5m)."""
    dashboard = json.loads(DASHBOARD.read_text())
    records = [
        {"record": f"dashboard:panel_{n}", "expr": expr.replace("$__rate_interval", "5m")}
        for n, (_panel, expr) in enumerate(dashboard_targets(dashboard))
    ]
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    checked = promtool("check", "rules", rules_file)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_readme_documents_every_exported_metric(exported: set[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    for name in exported:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{name}`" in readme or f"`{base}`" in readme, name
