"""Field checks for the decoders: each names the field and what is wrong with it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from bus_adapters.base import Delivery
from hms_mgmt.bounds import NAME_PATTERN, check_id
from hms_mgmt.errors import InvalidMessageError
from hms_mgmt.wire.codec import MAX_BATCH, decode_body

T = TypeVar("T")


def field(
    data: dict[str, Any], key: str, kind: type[T] | tuple[type, ...], *, optional: bool = False
) -> Any:
    if key not in data or data[key] is None:
        if optional:
            return None
        raise InvalidMessageError(f"field {key!r} is missing")
    value = data[key]
    if kind is int or kind is float or kind == (int, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and kind is int:
            ok = isinstance(value, int)
        if ok and isinstance(value, float):
            ok = math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise InvalidMessageError(f"field {key!r} has the wrong type ({type(value).__name__})")
    return value


def name(data: dict[str, Any], key: str) -> str:
    value: str = field(data, key, str)
    if not NAME_PATTERN.fullmatch(value):
        raise InvalidMessageError(f"field {key!r} is not a valid name: {value[:100]!r}")
    return value


def ident(data: dict[str, Any], key: str) -> str:
    return check_id(field(data, key, str), f"field {key!r}", InvalidMessageError)


def token(data: dict[str, Any]) -> str | None:
    value: str | None = field(data, "token", str, optional=True)
    if value is not None and len(value) > 128:
        raise InvalidMessageError("field 'token' is longer than 128 characters")
    return value


def positive(data: dict[str, Any], key: str) -> int:
    value: int = field(data, key, int)
    if value < 1:
        raise InvalidMessageError(f"field {key!r} must be >= 1, not {value}")
    return value


def items(data: dict[str, Any], key: str) -> list[Any]:
    items = data.get(key)
    if not isinstance(items, list) or not items:
        raise InvalidMessageError(f"field {key!r} must be a non-empty list")
    if len(items) > MAX_BATCH:
        raise InvalidMessageError(f"{len(items)} items in {key!r}; at most {MAX_BATCH}")
    return items


Refused = tuple[Any, str]


def decode_items(
    delivery: Delivery, key: str, parse: Callable[[Any], T]
) -> tuple[list[T], list[Refused]]:
    """The valid items of a batch message and the refused ones; a bad envelope raises."""
    data = decode_body(delivery.body, delivery.content_type)
    good: list[T] = []
    refused: list[Refused] = []
    for item in items(data, key):
        try:
            good.append(parse(item))
        except InvalidMessageError as exc:
            refused.append((item, str(exc)))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a check we missed
            refused.append((item, f"malformed item: {exc!r}"))
    return good, refused
