"""Message-bus adapters for HMS-MGMT: the interface, RabbitMQ (aio-pika) and in-memory."""

from bus_adapters.base import (
    Bus,
    BusError,
    Delivery,
    Message,
    PublishNotConfirmedError,
    QueueSpec,
    UnroutableError,
    open_bus,
)

__all__ = (
    "Bus",
    "BusError",
    "Delivery",
    "Message",
    "PublishNotConfirmedError",
    "QueueSpec",
    "UnroutableError",
    "open_bus",
)
