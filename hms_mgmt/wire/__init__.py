"""The wire format: what travels on the bus, cut by message kind.

``codec`` (JSON and its limits), ``fields`` (checks for decoders), ``steps`` (step
messages), ``outcomes`` (what step services report), ``requests`` (client requests and
the engine's replies). The broker names are in :mod:`hms_mgmt.topology`; the reference
for other runtimes is in ``docs/wire-format.md``, and JSON Schemas of the four messages
are shipped in ``schemas/`` (:func:`schema`).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

SCHEMAS = ("step-message", "outcomes-message", "requests-message", "replies-message")


def schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one message, by name: one of :data:`SCHEMAS`."""
    if name not in SCHEMAS:
        raise ValueError(f"no schema {name!r}; there are {', '.join(SCHEMAS)}")
    text = resources.files(__name__).joinpath("schemas", f"{name}.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded
