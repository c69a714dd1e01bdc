"""The outcome decoder against msgspec: is a typed decoder worth a second code path?

``pip install msgspec && python benchmarks/decoders.py`` (from the repository root, with the
project's virtualenv). Decodes one batch of 64 outcomes (the engine's busiest message) with
``hms_mgmt.wire.outcomes.decode_outcomes`` (orjson and the engine's checks, refusing an item
alone and naming its field) and with msgspec Structs mirroring the same fields (which
refuse the whole batch, without the depth, 64-bit, id pattern and bound checks), and
prints the time per batch and per outcome, best of 5.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path
from typing import Any, Literal

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bus_adapters.base import Delivery
from hms_mgmt.wire.outcomes import Outcome, decode_outcomes, outcomes_message


class Result(msgspec.Struct, forbid_unknown_fields=True):
    next_step: str | None = None
    data: Any = None
    complete: bool | None = None
    delay: float | None = None
    run_at: float | None = None
    wait_for: str | None = None
    timeout: float | None = None
    attributes: dict[str, str] | None = None


class Error(msgspec.Struct):
    type: str
    message: str
    types: list[str] | None = None
    traceback: str | None = None
    retryable: bool | None = None
    retry_delay: float | None = None


class TypedOutcome(msgspec.Struct):
    workflow_id: str
    seq: int
    kind: Literal["started", "heartbeat", "succeeded", "failed"]
    step: str = ""
    attempt: int = 0
    result: Result | None = None
    error: Error | None = None
    started_at: float | None = None
    finished_at: float | None = None
    handler: str | None = None
    token: str | None = None


class Outcomes(msgspec.Struct):
    outcomes: list[TypedOutcome]


def batch() -> bytes:
    data = {"applicant": "A-17", "amount": 12000, "score": 712, "notes": "x" * 80}
    items = [
        Outcome(
            workflow_id=f"{i:032x}",
            seq=3,
            kind="succeeded",
            step="creditCheck",
            attempt=1,
            result={"next_step": "scheduleInspection", "data": data},
            started_at=1764000000.123,
            finished_at=1764000000.125,
            handler="svc",
            token="t" * 43,
        ).encoded
        for i in range(64)
    ]
    return outcomes_message(items).body


async def _nothing(*_: Any) -> None:
    return None


def main() -> None:
    body = batch()
    delivery = Delivery(
        body=body,
        queue="hms.engine.results",
        routing_key="hms.engine.results",
        exchange="hms.results",
        headers={},
        message_id="m",
        content_type="application/json",
        correlation_id=None,
        reply_to=None,
        redelivered=False,
        _ack=_nothing,
        _reject=_nothing,
    )
    decoder = msgspec.json.Decoder(Outcomes)
    good, refused = decode_outcomes(delivery)
    assert len(good) == 64 and not refused
    assert len(decoder.decode(body).outcomes) == 64
    for name, run in (
        ("orjson + the engine's checks", lambda: decode_outcomes(delivery)),
        ("msgspec Structs", lambda: decoder.decode(body)),
    ):
        best = min(timeit.repeat(run, number=2000, repeat=5)) / 2000 * 1e6
        print(
            f"{name}: {best:.0f} us per 64-outcome batch ({len(body)} bytes), "
            f"{best / 64:.2f} us per outcome"
        )


if __name__ == "__main__":
    main()
