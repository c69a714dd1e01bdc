"""The JSON codec of everything on the bus, and its limits.

Everything is JSON (``application/json``), at most :data:`MAX_MESSAGE_BYTES` and
:data:`MAX_DEPTH` levels deep, with integers that fit 64 bits. Decoders raise
:class:`InvalidMessageError` with a reason that names what is wrong; the reason travels
with the message into its dead-letter queue.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from bus_adapters.base import JSON_CONTENT_TYPE
from hms_mgmt.bounds import INT_MAX, INT_MIN, short
from hms_mgmt.errors import InvalidMessageError, PayloadError

try:  # orjson is a dependency; the fallback keeps a platform without its wheels working
    import orjson

    # orjson would write a datetime, date or time as an ISO string, and a naive one without
    # its zone: refused instead, like the standard json module does (see encode_payload).
    _OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value, option=_OPTIONS)

    def _loads(data: bytes) -> Any:
        return orjson.loads(data)

    _DECODE_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError, RecursionError)
except ImportError:  # pragma: no cover - depends on the environment
    _encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    def dumps(value: Any) -> bytes:
        return _encoder.encode(value).encode()

    def _loads(data: bytes) -> Any:
        return json.loads(data.decode("utf-8"))

    _DECODE_ERRORS = (ValueError, RecursionError)  # ValueError: over 4300 digits, too

_strict = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def check_finite(value: Any) -> None:
    """Raise ``ValueError`` for NaN or Infinity, which JSON cannot carry (orjson writes null)."""
    _strict.encode(value)


MAX_MESSAGE_BYTES = 1024 * 1024
MAX_PAYLOAD_BYTES = MAX_MESSAGE_BYTES - 16 * 1024  # room for the envelope around a payload
MAX_REPLY_BYTES = 64 * 1024 * 1024  # the engine's answers (a long workflow's state) may be larger
MAX_DEPTH = 64


def new_id() -> str:
    return uuid.uuid4().hex


def encode_payload(payload: Any, *, what: str = "payload") -> bytes:
    """The payload as JSON, refusing what cannot travel: raises :class:`PayloadError`."""
    try:
        body = dumps(payload)  # refuses integers beyond 64 bits and keys that are not strings
        if b"null" in body:
            check_finite(payload)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise PayloadError(
            f"{what} is not JSON-serialisable: {why_not_json(payload, exc, what)}"
        ) from exc
    if len(body) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"{what} is {len(body)} bytes as JSON; the limit is {MAX_PAYLOAD_BYTES}")
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _deeper_than(payload, MAX_DEPTH):
        raise PayloadError(f"{what} is nested deeper than {MAX_DEPTH} levels")
    return body


def why_not_json(value: Any, exc: BaseException, what: str = "value") -> str:
    """Why ``value`` could not be encoded, naming the first offending field's path."""
    wide = _wide_int_in(value)
    if wide is not None:
        return f"{exc} ({short(wide, 60)}; integers must be {INT_MIN} to {INT_MAX})"
    found = _first_not_json(value, what)
    if found is None:
        return str(exc)
    path, item = found
    kind = type(item).__name__
    if isinstance(item, datetime.date | datetime.time):
        return (
            f"{path} is a {kind}, which JSON cannot carry: send it as a string "
            "(value.isoformat(), with its time zone) or a number (a timestamp)"
        )
    if isinstance(item, dict):
        return f"{path} has a key that is not a string"
    return f"{path} is a {kind} ({exc})"


_JSON_LEAVES = (str, int, float, bool, type(None))


def _first_not_json(value: Any, what: str) -> tuple[str, Any] | None:
    """The path and value of the first thing in ``value`` JSON cannot carry as it is."""
    stack: list[tuple[str, Any]] = [(what, value)]
    seen = 0
    while stack and seen < 1_000_000:
        path, item = stack.pop()
        seen += 1
        if isinstance(item, datetime.date | datetime.time):
            return path, item
        if isinstance(item, float) and not math.isfinite(item):
            return path, item
        if isinstance(item, _JSON_LEAVES):
            continue
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                return path, item
            stack.extend((f"{path}[{key!r}]", child) for key, child in reversed(item.items()))
        elif isinstance(item, list | tuple):
            stack.extend((f"{path}[{i}]", child) for i, child in reversed(list(enumerate(item))))
        else:
            return path, item
    return None


def decode_body(
    body: bytes, content_type: str | None, *, limit: int = MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """Bytes from the bus as a JSON object, or :class:`InvalidMessageError` saying why not."""
    if content_type != JSON_CONTENT_TYPE:
        raise InvalidMessageError(f"content type {content_type!r} is not {JSON_CONTENT_TYPE}")
    if len(body) > limit:
        raise InvalidMessageError(f"message of {len(body)} bytes exceeds {limit}")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessageError(f"body is not UTF-8: {exc}") from exc
    try:
        value = _loads(body)  # orjson refuses nesting beyond 1024 levels by itself, safely
    except _DECODE_ERRORS as exc:
        if "depth limit" in str(exc):
            raise InvalidMessageError(f"body is nested deeper than {MAX_DEPTH} levels") from exc
        _refuse_wide_integers(body)  # orjson calls one beyond 1e308 "infinity"
        raise InvalidMessageError(f"body is not JSON: {exc}") from exc
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise InvalidMessageError(f"body is nested deeper than {MAX_DEPTH} levels")
    _refuse_wide_integers(body)
    if not isinstance(value, dict):
        raise InvalidMessageError(f"body is a JSON {type(value).__name__}, not an object")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether a decoded JSON value nests deeper than ``limit``; only containers are walked."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, level + 1))
    return False


_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# The precheck for a number of 19 digits or more (-2**63 has 19, 2**64 - 1 has 20) where
# JSON puts numbers, after ':', ',' or '[' (and a sign, spaces aside): the text is mapped to a
# few classes of bytes and searched with bytes.find, ten times as fast as a regular
# expression on text without a match. Digits inside strings (hex ids, tokens) seldom follow
# one of these; when they do, the careful scan below finds no integer and costs only time.
_CLASSES = bytes(
    ord("9") if byte in b"0123456789"
    else ord(":") if byte in b":,["
    else ord("-") if byte == ord("-")
    else ord("x")
    for byte in range(256)
)  # fmt: skip
_RUN = b"9" * 19
_LONG_NUMBER_STARTS = (b":" + _RUN, b":-" + _RUN)
_WHITESPACE = b" \t\r\n"  # deleted: JSON puts none inside a number
_NUMBER = re.compile(rb"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def _refuse_wide_integers(body: bytes) -> None:
    """Refuse JSON text with an integer literal outside 64 bits; scanned only when the body
    has a run of 19 digits."""
    classes = body.translate(_CLASSES, _WHITESPACE)
    if _RUN in classes and any(start in classes for start in _LONG_NUMBER_STARTS):
        wide = _wide_literal(body)
        if wide is not None:
            raise InvalidMessageError(
                f"body has the integer {wide}, outside 64 bits ({INT_MIN} to {INT_MAX}); "
                "send such a number as a string"
            )


def _wide_literal(body: bytes) -> str | None:
    """The first integer literal of (valid) JSON text outside 64 bits, shortened; else None.

    orjson reads such an integer as a float, silently; strings are dropped first.
    """
    for match in _NUMBER.finditer(_STRINGS.sub(b'""', body)):
        literal = match.group()
        if match.group(1) or match.group(2) or len(literal) < 19:
            continue  # a fraction or an exponent is a float anyway
        digits = literal.lstrip(b"-").lstrip(b"0")
        if len(digits) > 20 or not INT_MIN <= int(literal) <= INT_MAX:
            text = literal.decode()
            return text if len(text) <= 40 else f"{text[:30]}... ({len(digits)} digits)"
    return None


def _wide_int_in(value: Any) -> int | None:
    """The first integer in a value that is outside 64 bits (for an error message)."""
    stack, seen = [value], 0
    while stack and seen < 1_000_000:
        item = stack.pop()
        seen += 1
        if isinstance(item, int) and not isinstance(item, bool):
            if not INT_MIN <= item <= INT_MAX:
                return item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None


T = TypeVar("T")


MAX_BATCH = 1000
BATCH_BYTES = 512 * 1024


def batches(
    items: Iterable[T], size_of: Callable[[T], int], *, max_items: int = MAX_BATCH
) -> Iterator[list[T]]:
    """Items grouped into batches of at most ``max_items`` and :data:`BATCH_BYTES`.

    A batch is closed before an item that would take it past the byte limit, so a
    batch never exceeds it unless a single item does (and then it travels alone).
    """
    batch: list[T] = []
    size = 0
    for item in items:
        length = size_of(item) + 1
        if batch and (len(batch) >= max_items or size + length > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += length
    if batch:
        yield batch


def batch_body(key: str, items: list[bytes]) -> bytes:
    """``{"<key>": [item, ...]}`` from items already encoded (no re-encoding)."""
    return b'{"' + key.encode() + b'":[' + b",".join(items) + b"]}"
