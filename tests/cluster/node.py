"""A 3-node RabbitMQ cluster of private nodes, for the cluster suite; the machine's own broker
(``rabbit@localhost``) is never touched, and never joined.

Each node runs as the ``rabbitmq`` user (Debian's wrapper, which shares the machine's Erlang
cookie), on AMQP ports 15000-16999 (the chaos suite's node takes 23000-25999) with their
distribution ports 5000 above, all below Linux's ephemeral ports (32768 and up, which
outgoing connections may take), its data, logs, config and pid file under one temporary folder
that user owns, and ``net_ticktime = 10`` so the others see a dead peer in about 15 s.
Nodes 2 and 3 ``join_cluster`` node 1 (``../shared/PITFALLS.md``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.private_node import PrivateNode, port_free

DIST_OFFSET = 5000  # AMQP 15000-16999, distribution 20000-21999: below the ephemeral ports


def free_ports(count: int, low: int = 15000, high: int = 17000) -> list[int]:
    """``count`` AMQP ports in [low, high) free with their distribution ports (+5000), all
    below Linux's ephemeral ports (32768 and up), which outgoing connections may take."""
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
        self.size = size
        self.folder = Path(tempfile.mkdtemp(prefix="hms-cluster-"))
        os.chown(self.folder, pwd.getpwnam("rabbitmq").pw_uid, -1)
        self.nodes = self._new_nodes()

    def _new_nodes(self) -> list[ClusterNode]:
        run = uuid.uuid4().hex[:6]
        return [
            ClusterNode(i + 1, run, port, self.folder / run / f"node{i + 1}")
            for i, port in enumerate(free_ports(self.size))
        ]

    def start(self, attempts: int = 2) -> None:
        """Boot and join the nodes; a node that fails to boot (a port taken meanwhile, say)
        is reported with its log's tail, and the cluster is booted again on new ports."""
        for attempt in range(1, attempts + 1):
            try:
                self._start()
                return
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                tails = "\n".join(node.log_tail() for node in self.nodes)
                for node in self.nodes:
                    node.stop()
                if attempt == attempts:
                    raise RuntimeError(f"the cluster did not boot: {exc}\n{tails}") from exc
                print(f"the cluster did not boot ({exc}); again on new ports\n{tails}")
                self.nodes = self._new_nodes()

    def _start(self) -> None:
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
