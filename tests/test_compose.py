"""compose.yaml cannot run here (no Docker engine); check that it stays a valid, wired file."""

from __future__ import annotations

from urllib.parse import urlsplit

import yaml

from bus_adapters.nodes import split_urls
from tests.conftest import ROOT


def test_compose_file_wires_the_broker_engine_and_step_service() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"rabbitmq", "engine", "grant-service"}
    assert "management" in services["rabbitmq"]["image"]
    assert "healthcheck" in services["rabbitmq"]
    for name in ("engine", "grant-service"):
        service = services[name]
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert service["environment"]["HMS_BROKER_URL"].startswith("amqp://")
    assert services["engine"]["command"][:3] == ["python", "-m", "hms_mgmt.engine"]
    assert services["grant-service"]["command"][-1] == "examples.grant_approval.service:mgmt"
    assert (ROOT / "Dockerfile").exists()


def test_compose_file_wires_the_http_ports_and_health_checks() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for name, variable in (("engine", "HMS_HTTP_PORT"), ("grant-service", "HMS_WORKER_HTTP_PORT")):
        service = services[name]
        port = service["environment"][variable]
        assert port.isdigit(), name
        # published on the host's loopback only, to the port the process listens on
        assert f"127.0.0.1:{port}:{port}" in service["ports"], name
        check = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in check, name
        assert service["healthcheck"]["test"][0] == "CMD"
    engine = services["engine"]["environment"]
    # beyond the container's loopback: the token must be wired for changes to be possible
    assert engine["HMS_HTTP_HOST"] == "0.0.0.0"
    assert "HMS_HTTP_TOKEN" in engine["HMS_HTTP_TOKEN"]


def test_compose_monitoring_profile_mounts_the_rules_and_the_dashboard() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name  # not in a plain `up`
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            assert (ROOT / source).exists(), (name, source)
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    # the example scrapes compose's services on the ports they listen on
    engine = services["engine"]["environment"]["HMS_HTTP_PORT"]
    worker = services["grant-service"]["environment"]["HMS_WORKER_HTTP_PORT"]
    assert targets["hms-engine"] == [f"engine:{engine}"]
    assert targets["hms-steps"] == [f"grant-service:{worker}"]
    for path in ("datasources/prometheus.yml", "dashboards/hms-mgmt.yml"):
        assert yaml.safe_load((ROOT / "deploy/grafana/provisioning" / path).read_text())


def test_the_cluster_compose_file_wires_three_nodes_postgres_and_two_engines() -> None:
    """compose.cluster.yaml: three RabbitMQ nodes that find each other, one cookie; PostgreSQL;
    two engines on the same store and the same three nodes; the grant service on them too."""
    services = yaml.safe_load((ROOT / "compose.cluster.yaml").read_text())["services"]
    nodes = [f"rabbitmq-{n}" for n in (1, 2, 3)]
    assert set(services) == {*nodes, "postgres", "engine-1", "engine-2", "grant-service"}
    config = (ROOT / "deploy/rabbitmq-cluster/rabbitmq.conf").read_text()
    cookies = set()
    for n, name in enumerate(nodes, 1):
        node = services[name]
        assert node["hostname"] == name
        assert f"classic_config.nodes.{n} = rabbit@{name}" in config
        assert "./deploy/rabbitmq-cluster/rabbitmq.conf:" in node["volumes"][0]
        assert "healthcheck" in node
        cookies.add(node["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"])
    assert len(cookies) == 1 and "-setcookie" in cookies.pop()
    assert "net_ticktime = 10" in config
    broker = services["grant-service"]["environment"]["HMS_BROKER_URL"]
    hosts = [urlsplit(url).hostname for url in split_urls(broker)]
    assert hosts == nodes
    engines = [services["engine-1"], services["engine-2"]]
    for engine in engines:
        environment = engine["environment"]
        assert environment["HMS_BROKER_URL"] == broker
        assert environment["HMS_STORE_URL"].startswith("postgresql://hms:")
        assert environment["HMS_STORE_URL"].endswith("@postgres:5432/hms")
        assert "postgres" in engine["build"]["args"]["EXTRAS"]
        assert engine["command"][:3] == ["python", "-m", "hms_mgmt.engine"]
        for dependency in (*nodes, "postgres"):
            assert engine["depends_on"][dependency]["condition"] == "service_healthy"
    assert engines[0]["environment"]["HMS_STORE_URL"] == engines[1]["environment"]["HMS_STORE_URL"]
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert len(published) == len({p.rsplit(":", 1)[0] for p in published})  # no host port twice
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert "ARG EXTRAS" in (ROOT / "Dockerfile").read_text()
