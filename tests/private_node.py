"""A private RabbitMQ node, for the suites that stop or break a broker (``tests/chaos``,
``tests/cluster``); the machine's own broker (``rabbit@localhost``) is never touched.

The node runs as the ``rabbitmq`` user (Debian's wrapper, which shares the machine's Erlang
cookie), on its own AMQP and distribution ports, with its data, logs, config and pid file
under a folder that user owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PrivateNode:
    def __init__(
        self, name: str, port: int, dist_port: int, folder: Path, *, config: str = ""
    ) -> None:
        self.name = name
        self.port = port
        self.dist_port = dist_port
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for sub in ("mnesia", "log"):
            (folder / sub).mkdir()
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{port}\n"
            "loopback_users = none\n"
            "vm_memory_high_watermark.relative = 0.4\n" + config
        )
        (folder / "enabled_plugins").write_text("[].\n")
        user = pwd.getpwnam("rabbitmq")
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(folder / "node.pid"),
        }

    def ctl(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {self.name} {' '.join(args)}: {done.stderr or done.stdout}"
            )
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

    def wait_port(self, *, open_: bool = True, timeout: float = 60) -> None:
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

    def log_tail(self, lines: int = 15) -> str:
        """The end of the node's own log, for a failure's message."""
        found = sorted((self.folder / "log").glob("*.log"))
        text = "".join(path.read_text(errors="replace") for path in found)
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- {self.name} ({self.folder / 'log'}):\n{tail or '(no log)'}"

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
