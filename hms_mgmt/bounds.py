"""Bounds on what the system accepts: ids, keys, delays and timestamps, integers.

Pure checks with no imports of the rest of the package, so that errors, definitions and
the wire format can all use them. Each takes the error class to raise, and names the bad
value and what is allowed.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from typing import Any

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
"""Workflow, step, signal and schedule names: a dot, ``*`` or ``#`` would break routing."""
MAX_DELAY = 10 * 365 * 86400
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,99}$")
ID_RULE = (
    "1-100 letters, digits, '_', '.', ':' or '-', starting with a letter, digit or '_' "
    f"({ID_PATTERN.pattern})"
)
MAX_KEY_LENGTH = 200


def short(value: Any, limit: int = 100) -> str:
    """``repr(value)`` for an error message: at most ``limit`` characters, safe for any value."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer of over 4300 digits, a deep structure
        bits = value.bit_length() if isinstance(value, int) else None
        text = f"<an integer of {bits} bits>" if bits else f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_delay(value: Any, what: str, error: type[Exception] = ValueError) -> float:
    """``value`` as seconds from 0 to :data:`MAX_DELAY`, or ``error`` naming it."""
    if not _real(value) or (isinstance(value, float) and not math.isfinite(value)):
        ok = False
    else:
        ok = 0 <= value <= MAX_DELAY
    if not ok:
        raise error(f"{what} must be seconds from 0 to {MAX_DELAY} (10 years), not {short(value)}")
    return float(value)


def check_run_at(
    value: Any, what: str, error: type[Exception] = ValueError, *, now: float | None = None
) -> float:
    """``value`` as a Unix timestamp from 0 to now + :data:`MAX_DELAY`, or ``error`` naming it."""
    latest = (time.time() if now is None else now) + MAX_DELAY
    if not _real(value) or (isinstance(value, float) and not math.isfinite(value)):
        ok = False
    else:
        ok = 0 <= value <= latest
    if not ok:
        raise error(
            f"{what} must be a Unix timestamp from 0 to 10 years from now ({latest:.0f}), "
            f"not {short(value)}"
        )
    return float(value)


TIME_RULE = (
    "seconds since the epoch (1796194800), an ISO 8601 time (2026-12-02T07:00:00Z; UTC when "
    "it has no offset), or a time ago (90s, 15m, 2h, 7d)"
)
_AGO = re.compile(r"^(\d{1,9}(?:\.\d{1,6})?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(
    text: str, error: type[Exception] = ValueError, *, now: float | None = None
) -> float:
    """A time given as text (a list's ``since`` or ``until``) as seconds since the epoch:
    see :data:`TIME_RULE`."""
    raw = text.strip()[:41]
    ago = _AGO.fullmatch(raw)
    if ago:
        return (time.time() if now is None else now) - float(ago[1]) * _UNIT[ago[2]]
    try:
        value = float(raw)
    except ValueError:
        value = _iso_time(raw)
    if not math.isfinite(value) or value < 0 or len(raw) > 40:
        raise error(f"{short(text)} is not a time: give {TIME_RULE}")
    return value


def _iso_time(raw: str) -> float:
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        return math.nan
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def check_time(value: Any, what: str, error: type[Exception] = ValueError) -> float:
    """A time as seconds since the epoch, from a number or an aware ``datetime``."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise error(f"{what} {short(value)} has no time zone: give an aware datetime")
        value = value.timestamp()
    if not _real(value) or not math.isfinite(value) or value < 0:
        raise error(f"{what} must be seconds since the epoch or a datetime, not {short(value)}")
    return float(value)


def check_schedule_id(value: Any, error: type[Exception] = ValueError) -> str:
    """A schedule id whose ticks' workflow ids (``<id>-<tick>``) are valid ids."""
    if not (isinstance(value, str) and valid_id(f"{value}-99999999999")):
        raise error(
            f"schedule id {short(value)} cannot name workflows: it must start with a letter, "
            "digit or '_' and be at most 88 characters, so that '<id>-<tick>' is an id"
        )
    return value


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def check_id(value: Any, what: str, error: type[Exception] = ValueError) -> str:
    """A workflow or request id matching :data:`ID_PATTERN`, or ``error`` naming it."""
    if not valid_id(value):
        raise error(f"{what} {short(value)} is not a valid id: ids are {ID_RULE}")
    return str(value)


def check_key(
    value: Any, what: str = "idempotency key", error: type[Exception] = ValueError
) -> str:
    """An idempotency key: 1 to :data:`MAX_KEY_LENGTH` printable characters, or ``error``."""
    if not (isinstance(value, str) and 1 <= len(value) <= MAX_KEY_LENGTH and value.isprintable()):
        raise error(
            f"{what} {short(value)} must be 1-{MAX_KEY_LENGTH} printable characters "
            "(no control characters)"
        )
    return value


ATTRIBUTE_KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
"""A business key's name (``application_id``): usable as ``attr.<key>`` in a query string."""
MAX_ATTRIBUTE_VALUE = 200
MAX_ATTRIBUTES = 20
ATTRIBUTE_RULE = (
    f"keys are 1-64 letters, digits, '_' or '-' starting with a letter or '_' "
    f"({ATTRIBUTE_KEY_PATTERN.pattern}); values are strings of 1-{MAX_ATTRIBUTE_VALUE} "
    f"printable characters; at most {MAX_ATTRIBUTES} at once"
)


def check_attributes(
    value: Any, what: str = "attributes", error: type[Exception] = ValueError
) -> dict[str, str]:
    """Business keys: a dict of at most :data:`MAX_ATTRIBUTES` string keys (matching
    :data:`ATTRIBUTE_KEY_PATTERN`) to strings of 1-:data:`MAX_ATTRIBUTE_VALUE` printable
    characters, or ``error`` naming the bad key or value."""
    if not isinstance(value, dict):
        raise error(f"{what} must be a dict of strings to strings, not {short(value)}")
    if len(value) > MAX_ATTRIBUTES:
        raise error(f"{what} has {len(value)} keys; at most {MAX_ATTRIBUTES} are allowed")
    for key, item in value.items():
        if not (isinstance(key, str) and ATTRIBUTE_KEY_PATTERN.fullmatch(key)):
            raise error(f"{what} key {short(key)} is not a valid key: {ATTRIBUTE_RULE}")
        if not (
            isinstance(item, str) and 1 <= len(item) <= MAX_ATTRIBUTE_VALUE and item.isprintable()
        ):
            raise error(
                f"{what} value {short(item)} of key {key!r} must be a string of "
                f"1-{MAX_ATTRIBUTE_VALUE} printable characters"
            )
    return dict(value)


PRIORITIES = range(1, 6)
DEFAULT_PRIORITY = 3


def check_priority(value: Any, what: str, error: type[Exception] = ValueError) -> int:
    """``value`` as a priority, a whole number from 1 (first) to 5 (last), or ``error``."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in PRIORITIES:
        raise error(f"{what} must be a whole number from 1 (first) to 5 (last), not {value!r}")
    return value


MAX_CHILDREN = 1000
"""Child workflows one step may start."""
PARENT_CLOSE = ("terminate", "abandon")
CHILD_KEYS = frozenset({"workflow", "data", "parent_close"})


def child_problem(value: Any) -> str | None:
    """What is wrong with a step result's ``child`` value, or None: a child is
    ``{"workflow": name, "data": ..., "parent_close": "terminate" | "abandon"}``, and
    ``child`` is one of them or a list of 1 to :data:`MAX_CHILDREN` of them."""
    specs = value if isinstance(value, list) else [value]
    if not specs or len(specs) > MAX_CHILDREN:
        return f"'child' is a list of {len(specs)} children; a step starts 1 to {MAX_CHILDREN}"
    for index, spec in enumerate(specs):
        where = f"child {index}" if isinstance(value, list) else "'child'"
        if not isinstance(spec, dict):
            return f"{where} is {short(spec)}; expected {{'workflow': name, 'data': ...}}"
        unknown = set(spec) - CHILD_KEYS
        if unknown:
            return f"{where} has unknown keys {sorted(unknown)}; expected {sorted(CHILD_KEYS)}"
        name = spec.get("workflow")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            return f"{where} names workflow {short(name)}, which is not a workflow name"
        close = spec.get("parent_close", "terminate")
        if close not in PARENT_CLOSE:
            return f"{where} has parent_close {short(close)}; expected 'terminate' or 'abandon'"
    return None
