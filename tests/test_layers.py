"""The house's rules that the import-linter contracts do not see: what importing a part loads."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def loaded_by(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(done.stdout.split())


def test_the_pure_machine_loads_no_client_no_broker_no_store() -> None:
    loaded = loaded_by("hms_mgmt.machine")
    heavy = {"hms_mgmt.client", "hms_mgmt.management", "hms_mgmt.worker", "hms_mgmt.engine"}
    heavy |= {"hms_mgmt.store", "aio_pika", "aiohttp", "sqlite3"}
    assert not loaded & heavy, sorted(loaded & heavy)


def test_a_client_loads_no_engine_and_no_store() -> None:
    loaded = loaded_by("hms_mgmt")
    assert "hms_mgmt.engine.engine" not in loaded and "hms_mgmt.store.sqlite" not in loaded
