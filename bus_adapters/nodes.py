"""Several broker nodes behind one ``HMS_BROKER_URL``: parse the list, connect to the first
that answers, and fail over to the others when a connection dies.

``HMS_BROKER_URL=amqp://u:p@mq1:5672/grants,amqp://u:p@mq2:5672/grants,...`` names the nodes
of one RabbitMQ cluster (a comma inside a password is written ``%2C``). aio-pika's robust
connection takes one URL; :class:`FailoverConnection` is that connection with a list: after
each drop or failed attempt it moves to the next node, so a reconnect goes to a live node
while a dead one stays dead. Channels, declarations and consumers are restored as with one
URL; publisher confirms are per channel and unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
from aio_pika import RobustConnection
from aio_pika.abc import AbstractConnection
from yarl import URL

from bus_adapters.base import BrokerConnectError, redact_url

SCHEMES = ("amqp", "amqps")


def split_urls(text: str) -> list[str]:
    """The broker URLs in ``text``, comma-separated, in order; each checked to be AMQP with a
    host. Raises :class:`ValueError` naming the bad one (without its password)."""
    urls = [part.strip() for part in text.split(",") if part.strip()]
    if not urls:
        raise ValueError("no broker URL given")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ValueError(
                f"broker URL {redact_url(url)!r} is not amqp://host[:port]/vhost "
                f"(several nodes: comma-separated URLs)"
            )
    if len(set(urls)) != len(urls):
        raise ValueError(f"broker URLs repeat a node: {redact_url(text)}")
    # One cluster shares its users and vhosts: a publisher's user_id must hold on every node.
    if len({_vhost(url) for url in urls}) > 1:
        raise ValueError(f"broker URLs name different vhosts: {redact_url(text)}")
    if len({urlsplit(url).username for url in urls}) > 1:
        raise ValueError(f"broker URLs name different users: {redact_url(text)}")
    return urls


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return path[1:] if len(path) > 1 else "/"


def with_query(url: str, parameter: str) -> str:
    """``parameter`` (``name=value``) added to the query of each URL of a list."""
    return ",".join(
        u if f"{parameter.split('=', 1)[0]}=" in u else f"{u}{'&' if '?' in u else '?'}{parameter}"
        for u in split_urls(url)
    )


class FailoverConnection(RobustConnection):
    """A robust connection over several nodes: each drop, and each failed attempt, moves it
    to the next node of the list, round the ring."""

    def __init__(self, url: URL, *args: Any, nodes: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self.nodes = [URL(node) for node in nodes] or [URL(url)]
        self.index = next((i for i, u in enumerate(self.nodes) if u == URL(url)), 0)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # Called on a drop and on every failed attempt; the next attempt reads self.url. The
        # close callbacks (a log line naming the node lost) run first, on the old node.
        await super()._on_connection_close(closing)
        if not self._close_called and len(self.nodes) > 1:
            self.index = (self.index + 1) % len(self.nodes)
            self.url = self.nodes[self.index]

    @property
    def node(self) -> str:
        """The node this connection is on (or tries next), without its password."""
        return redact_url(str(self.url))


async def _first(
    urls: Sequence[str], attempt: Callable[[str], Any]
) -> tuple[Any, list[tuple[str, BaseException]]]:
    failures: list[tuple[str, BaseException]] = []
    for url in urls:
        try:
            return await attempt(url), failures
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
            failures.append((url, exc))
    return None, failures


def _all_failed(
    failures: list[tuple[str, BaseException]],
    one: Callable[[str, BaseException], BrokerConnectError],
) -> BrokerConnectError:
    if len(failures) == 1:
        return one(*failures[0])
    errors = [one(url, exc) for url, exc in failures]
    tried = "; ".join(str(error) for error in errors)
    return BrokerConnectError(
        f"no broker node of {len(failures)} answered: {tried}",
        refused=all(error.refused for error in errors),
    )


async def connect_robust(
    url: str,
    *,
    name: str,
    explain: Callable[[str, BaseException], BrokerConnectError],
    timeout: float | None = None,
) -> FailoverConnection:
    """A robust connection to the first node of ``url`` (a comma-separated list) that
    answers, which fails over round the others later. If none answers, one
    :class:`BrokerConnectError` names every node tried and why (``explain`` words each)."""
    urls = split_urls(url)

    async def attempt(node: str) -> FailoverConnection:
        connection = FailoverConnection(
            URL(node), nodes=urls, client_properties={"connection_name": name}
        )
        try:
            await connection.connect(timeout=timeout)
        except BaseException:
            await connection.close()
            raise
        return connection

    connection, failures = await _first(urls, attempt)
    if connection is None:
        raise _all_failed(failures, explain)
    return connection  # type: ignore[no-any-return]


async def connect_plain(
    url: str,
    *,
    name: str,
    explain: Callable[[str, BaseException], BrokerConnectError],
    start: int = 0,
) -> AbstractConnection:
    """A plain (not robust) connection to the first node that answers, trying them from the
    ``start``-th on (the one a process's other connections are on, say): for what must end
    with its connection, such as a lock."""

    async def attempt(node: str) -> AbstractConnection:
        return await aio_pika.connect(node, client_properties={"connection_name": name})

    urls = split_urls(url)
    start %= len(urls)
    connection, failures = await _first(urls[start:] + urls[:start], attempt)
    if connection is None:
        raise _all_failed(failures, explain)
    return connection  # type: ignore[no-any-return]
