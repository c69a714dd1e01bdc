"""Message-bus adapters for HMS-MGMT: the interface, RabbitMQ (aio-pika) and in-memory.

The factory lives here, not in ``base``: ``base`` is the seam both adapters import, and a
factory there would import them back.
"""

from bus_adapters.base import (
    BrokerConnectError,
    Bus,
    BusError,
    Delivery,
    Message,
    PublishNotConfirmedError,
    QueueMismatchError,
    QueueSpec,
    UnroutableError,
)


def open_bus(url: str, *, name: str = "hms") -> Bus:
    """Pick the adapter for a broker URL: ``amqp://``/``amqps://`` or ``memory://``."""
    if url.startswith(("amqp://", "amqps://")):
        from bus_adapters.rabbitmq import RabbitMQBus

        return RabbitMQBus(url, name=name)
    if url.startswith("memory://"):
        from bus_adapters.memory import MemoryBus

        return MemoryBus(url)
    raise ValueError(f"unsupported broker URL {url!r}: use amqp://, amqps:// or memory://")


__all__ = (
    "BrokerConnectError",
    "Bus",
    "BusError",
    "Delivery",
    "Message",
    "PublishNotConfirmedError",
    "QueueMismatchError",
    "QueueSpec",
    "UnroutableError",
    "open_bus",
)
