"""A private RabbitMQ node for fault injection; the shared node is never touched.

The node runs as the ``rabbitmq`` user (Debian's wrapper), on its own ports,
with its data and logs under a temporary folder that user owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


def _free_port(low: int = 20000, high: int = 45000) -> int:
    for port in range(low + os.getpid() % 1000 * 17 % (high - low - 2000), high):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port for a private RabbitMQ node")


class RabbitNode:
    def __init__(self) -> None:
        self.name = f"chaos-{uuid.uuid4().hex[:6]}@localhost"
        self.port = _free_port()
        self.dist_port = self.port + 10000
        self.folder = Path(tempfile.mkdtemp(prefix="hms-chaos-rabbit-"))
        user = pwd.getpwnam("rabbitmq")
        for sub in ("mnesia", "log"):
            (self.folder / sub).mkdir()
        config = self.folder / "rabbitmq.conf"
        config.write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "vm_memory_high_watermark.relative = 0.4\n"
        )
        (self.folder / "enabled_plugins").write_text("[].\n")
        for path in [self.folder, *self.folder.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    def start(self) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True, timeout=60)
        deadline = time.monotonic() + 120
        while True:  # -detached returns before the node is registered: wait for it to answer
            try:
                self.ctl("await_startup", "--timeout", "60", timeout=90)
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.wait_port()

    def wait_port(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} does not listen on {self.port}")

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
        try:
            self.ctl("stop", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            subprocess.run(["pkill", "-9", "-f", f"-sname {self.name}"], check=False)
        shutil.rmtree(self.folder, ignore_errors=True)
