"""The chaos suite's private RabbitMQ node (:class:`tests.private_node.PrivateNode`), with
the faults it injects: its app stopped and started, connections closed, a memory alarm."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from tests.private_node import PrivateNode, port_free

DIST_OFFSET = 5000


def _free_port(low: int = 23000, high: int = 26000) -> int:
    """An AMQP port, and its distribution port, below Linux's ephemeral ports (32768 and up):
    one there may be taken by an outgoing connection between this check and the node's boot."""
    start = low + os.getpid() % 1000 * 17 % (high - low)
    for offset in range(high - low):
        port = low + (start - low + offset) % (high - low)
        if port_free(port) and port_free(port + DIST_OFFSET):
            return port
    raise RuntimeError("no free port for a private RabbitMQ node")


class RabbitNode(PrivateNode):
    def __init__(self) -> None:
        port = _free_port()
        super().__init__(
            f"chaos-{uuid.uuid4().hex[:6]}@localhost",
            port,
            port + DIST_OFFSET,
            Path(tempfile.mkdtemp(prefix="hms-chaos-rabbit-")),
        )

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> None:
        self.launch()
        self.await_up()

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.wait_port()

    def close_all_connections(self) -> None:
        self.ctl("close_all_connections", "chaos test")

    def memory_alarm(self, on: bool) -> None:
        self.ctl("set_vm_memory_high_watermark", "0" if on else "0.4")

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.folder, ignore_errors=True)
