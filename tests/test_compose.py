"""compose.yaml cannot run here (no Docker engine); check that it stays a valid, wired file."""

from __future__ import annotations

import yaml

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
