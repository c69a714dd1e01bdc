"""A 3-node RabbitMQ cluster of private nodes, for the cluster suite; the machine's own broker
(``rabbit@localhost``) is never touched, and never joined.

Each node runs as the ``rabbitmq`` user (Debian's wrapper, which shares the machine's Erlang
cookie), on AMQP ports below 20000 (the chaos suite's nodes take 20000 and up) with their
distribution ports 20000 above, its data, logs, config and pid file under one temporary folder
that user owns, and ``net_ticktime = 10`` so the others see a dead peer in about 15 s.
Nodes 2 and 3 ``join_cluster`` node 1 (``../shared/PITFALLS.md``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.private_node import PrivateNode, port_free

DIST_OFFSET = 20000


def free_ports(count: int, low: int = 15000, high: int = 19990) -> list[int]:
    """``count`` AMQP ports in [low, high) free with their distribution ports (+20000)."""
    found: list[int] = []
    start = low + os.getpid() * 7 % (high - low)
    for offset in range(high - low):
        port = low + (start - low + offset) % (high - low)
        if port_free(port) and port_free(port + DIST_OFFSET):
            found.append(port)
            if len(found) == count:
                return found
    raise RuntimeError("no free ports for a private RabbitMQ cluster")


class ClusterNode(PrivateNode):
    def __init__(self, index: int, run: str, port: int, folder: Path) -> None:
        super().__init__(
            f"hmsc{index}-{run}@localhost",
            port,
            port + DIST_OFFSET,
            folder,
            config="net_ticktime = 10\n",  # a dead peer seen in about 15 s, not about 70
        )

    def url(self, vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"


class RabbitCluster:
    """Three private nodes, clustered; the first is the one the others join."""

    def __init__(self, size: int = 3) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="hms-cluster-"))
        os.chown(self.folder, pwd.getpwnam("rabbitmq").pw_uid, -1)
        run = uuid.uuid4().hex[:6]
        self.nodes = [
            ClusterNode(i + 1, run, port, self.folder / f"node{i + 1}")
            for i, port in enumerate(free_ports(size))
        ]

    def start(self) -> None:
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.await_up()
        first = self.nodes[0]

        def join(node: ClusterNode) -> None:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
            node.await_up()

        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(join, self.nodes[1:]))
        running = first.ctl("eval", "rabbit_nodes:all_running().")
        missing = [n.name for n in self.nodes if n.name.split("@")[0] not in running]
        if missing:
            raise RuntimeError(f"nodes not clustered: {missing} ({running.strip()})")

    def urls(self, vhost: str) -> str:
        return ",".join(node.url(vhost) for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
