"""A 3-node RabbitMQ cluster of private nodes, for the cluster suite; the machine's own broker
(``rabbit@localhost``) is never touched, and never joined.

Each node runs as the ``rabbitmq`` user (Debian's wrapper, which shares the machine's Erlang
cookie), on AMQP ports below 20000 (the chaos suite's nodes take 20000 and up) with their
distribution ports 20000 above, its data, logs, config and pid file under one temporary folder
that user owns, and ``net_ticktime = 10`` so the others see a dead peer in about 15 s.
Nodes 2 and 3 ``join_cluster`` node 1 (``../shared/PITFALLS.md``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DIST_OFFSET = 20000


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, low: int = 15000, high: int = 19990) -> list[int]:
    """``count`` AMQP ports in [low, high) free with their distribution ports (+20000)."""
    found: list[int] = []
    start = low + os.getpid() * 7 % (high - low)
    for offset in range(high - low):
        port = low + (start - low + offset) % (high - low)
        if _free(port) and _free(port + DIST_OFFSET):
            found.append(port)
            if len(found) == count:
                return found
    raise RuntimeError("no free ports for a private RabbitMQ cluster")


class ClusterNode:
    def __init__(self, index: int, run: str, port: int, folder: Path) -> None:
        self.name = f"hmsc{index}-{run}@localhost"
        self.port = port
        self.folder = folder
        user = pwd.getpwnam("rabbitmq")
        folder.mkdir()
        for sub in ("mnesia", "log"):
            (folder / sub).mkdir()
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{port}\n"
            "loopback_users = none\n"
            "net_ticktime = 10\n"
            "vm_memory_high_watermark.relative = 0.4\n"
        )
        (folder / "enabled_plugins").write_text("[].\n")
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(port + DIST_OFFSET),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(folder / "node.pid"),
        }

    def url(self, vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"

    def ctl(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.name} {' '.join(args)}: {done.stderr}")
        return done.stdout

    def launch(self) -> None:
        """Start the node in the background; :meth:`await_up` waits for it."""
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True, timeout=60)

    def await_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:  # -detached returns before the node is registered: wait for it to answer
            try:
                self.ctl("await_startup", "--timeout", "60", timeout=90)
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.wait_port(open_=True, timeout=timeout)

    def wait_port(self, *, open_: bool, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    if open_:
                        return
            except OSError:
                if not open_:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: port {self.port} not {'open' if open_ else 'closed'}")

    def pid(self) -> int | None:
        try:
            return int((self.folder / "node.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """kill -9 the node's Erlang VM (its pid file names it) and wait for its port to close."""
        pid = self.pid()
        if pid is None:
            raise RuntimeError(f"{self.name} has no pid file")
        os.kill(pid, signal.SIGKILL)
        self.wait_port(open_=False)
        (self.folder / "node.pid").unlink(missing_ok=True)

    def stop(self) -> None:
        try:
            self.ctl("stop", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            pid = self.pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


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
