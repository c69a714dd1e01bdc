"""Measure a peer workflow system on the grant-shaped workload (standard library only).

    python benchmarks/peers/run_peer.py SYSTEM --n 2000 --runs 3 --lone 200 [--json out.json]

SYSTEM is one of: celery, dramatiq, dramatiq-confirms, taskiq.

What it does:
1. creates, once, a virtualenv for the peer under ``benchmarks/.venvs/<peer>`` and pip-installs the
   pinned requirements below (re-installs only when the pins change);
2. creates a fresh RabbitMQ vhost (``rabbitmqctl``) for this invocation;
3. starts ONE worker command (the peer's own CLI, default concurrency) in its own process group;
4. runs ``driver.py`` in the peer's venv: warm-up, ``--runs`` throughput runs of N workflows
   (worker stays up between runs), then ``--lone`` sequential workflows for latency;
5. stops the worker process group and deletes the vhost, also on error or Ctrl-C.

The workload (4 sequential steps validateApp, creditCheck, scheduleInspection, finalize, each
copying a ~200-byte JSON dict and adding one key) and the completion signal (one Redis INCR per
workflow, one RPUSH when the expected count is reached, BLPOPed by the driver) are in ``common.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

PEERS_DIR = Path(__file__).resolve().parent
VENVS_DIR = PEERS_DIR.parent / ".venvs"
RABBIT = ("127.0.0.1", 5672)
REDIS = ("127.0.0.1", 6379)
CPUS = os.cpu_count() or 1


@dataclass(frozen=True)
class System:
    venv: str
    module: str
    requirements: tuple[str, ...]
    worker: tuple[str, ...]  # argv; first item is a script in the venv's bin/
    settings: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def packages(self) -> list[str]:
        return [req.split("==")[0].split("[")[0] for req in self.requirements]


CELERY_REQS = (
    "celery==5.7.0",
    "kombu==5.7.0",
    "amqp==5.4.2",
    "billiard==4.3.2",
    "redis==7.4.1",
)
DRAMATIQ_REQS = ("dramatiq[rabbitmq]==2.2.1", "pika==1.4.4", "redis==7.4.1")
TASKIQ_REQS = (
    "taskiq==0.13.0",
    "taskiq-aio-pika==0.6.1",
    "aio-pika==10.2.1",
    "aiormq==7.2.4",
    "pamqp==4.0.1",
    "redis==7.4.1",
)
DRAMATIQ_SETTINGS = (
    "pipeline of 4 messages; RabbitmqBroker (pika), confirm_delivery={confirms};"
    f" default middleware; worker CLI defaults ({CPUS} processes x 8 threads);"
    " persistent messages; no result backend"
)

SYSTEMS: dict[str, System] = {
    "celery": System(
        venv="celery",
        module="peer_celery",
        requirements=CELERY_REQS,
        worker=("celery", "-A", "peer_celery", "worker", "--loglevel=WARNING"),
        settings=(
            "chain of 4 tasks; task_acks_late=True; prefork pool at default concurrency"
            f" ({CPUS}); default prefetch multiplier (4); no result backend; no publisher confirms;"
            " persistent messages"
        ),
    ),
    "dramatiq": System(
        venv="dramatiq",
        module="peer_dramatiq",
        requirements=DRAMATIQ_REQS,
        worker=("dramatiq", "peer_dramatiq"),
        settings=DRAMATIQ_SETTINGS.format(confirms=False),
        env={"HMS_BENCH_CONFIRMS": "0"},
    ),
    "dramatiq-confirms": System(
        venv="dramatiq",
        module="peer_dramatiq",
        requirements=DRAMATIQ_REQS,
        worker=("dramatiq", "peer_dramatiq"),
        settings=DRAMATIQ_SETTINGS.format(confirms=True),
        env={"HMS_BENCH_CONFIRMS": "1"},
    ),
    "taskiq": System(
        venv="taskiq",
        module="peer_taskiq",
        requirements=TASKIQ_REQS,
        worker=("taskiq", "worker", "peer_taskiq:broker", "--log-level", "WARNING"),
        settings=(
            "each task kicks the next (no chain primitive); AioPikaBroker defaults: quorum queue,"
            " persistent messages, publisher confirms awaited per publish, qos 10; worker CLI"
            " defaults (2 processes, up to 100 async tasks each); no result backend;"
            " driver awaits each start (kiq) in turn"
        ),
    ),
}


def log(message: str) -> None:
    print(f"[run_peer] {message}", flush=True)


def ensure_venv(system: System, base_python: str) -> Path:
    """Create ``benchmarks/.venvs/<venv>`` once and install the pinned requirements into it."""
    venv = VENVS_DIR / system.venv
    python = venv / "bin" / "python"
    marker = venv / ".hms-bench-requirements"
    wanted = "\n".join(system.requirements) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    t0 = time.monotonic()
    if not python.exists():
        log(f"creating virtualenv {venv}")
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    log(f"installing {' '.join(system.requirements)}")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *system.requirements], check=True)
    marker.write_text(wanted)
    log(f"virtualenv ready in {time.monotonic() - t0:.0f}s")
    return python


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True)


def check_reachable(name: str, address: tuple[str, int]) -> None:
    try:
        socket.create_connection(address, timeout=3).close()
    except OSError as error:
        sys.exit(f"{name} is not reachable on {address[0]}:{address[1]}: {error}")


def stop_group(proc: subprocess.Popen[bytes] | None, grace: float = 15.0) -> None:
    """SIGTERM the worker's process group, then SIGKILL whatever is left."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log("worker did not stop in time; killing it")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (pool children) too
    proc.wait()


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(system_name: str, args: argparse.Namespace) -> dict[str, Any]:
    system = SYSTEMS[system_name]
    python = ensure_venv(system, args.python)
    check_reachable("RabbitMQ", RABBIT)
    check_reachable("Redis", REDIS)

    vhost = f"hms-bench-{system_name}-{os.getpid()}"
    env = {
        **os.environ,
        **system.env,
        "HMS_BENCH_AMQP_URL": f"amqp://guest:guest@{RABBIT[0]}:{RABBIT[1]}/{vhost}",
        "HMS_BENCH_REDIS_URL": f"redis://{REDIS[0]}:{REDIS[1]}/0",
        "PYTHONPATH": str(PEERS_DIR),
        "PYTHONUNBUFFERED": "1",
    }
    worker_argv = [str(python.parent / system.worker[0]), *system.worker[1:]]
    worker: subprocess.Popen[bytes] | None = None
    driver: subprocess.Popen[bytes] | None = None
    log_fd, log_name = tempfile.mkstemp(prefix=f"hms-bench-{system_name}-", suffix=".log")
    out_fd, out_name = tempfile.mkstemp(prefix="hms-bench-", suffix=".json")
    os.close(out_fd)
    out_path = Path(out_name)
    ok = False
    log(f"vhost {vhost}")
    try:
        rabbitmqctl("add_vhost", vhost)
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        log(f"worker: {' '.join(system.worker)}  (log: {log_name})")
        worker = subprocess.Popen(
            worker_argv,
            cwd=PEERS_DIR,
            env=env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
        )
        driver_argv = [str(python), str(PEERS_DIR / "driver.py"), system.module]
        for flag in ("n", "runs", "lone", "warmup", "timeout"):
            driver_argv += [f"--{flag}", str(getattr(args, flag))]
        driver_argv += ["--worker-pid", str(worker.pid), "--out", str(out_path)]
        driver_argv += ["--packages", *system.packages]
        driver = subprocess.Popen(driver_argv, cwd=PEERS_DIR, env=env, stdin=subprocess.DEVNULL)
        while driver.poll() is None:
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited early with code {worker.returncode}")
            time.sleep(0.2)
        if driver.returncode != 0:
            raise RuntimeError(f"driver failed with code {driver.returncode}")
        result: dict[str, Any] = json.loads(out_path.read_text())
        ok = True
    finally:
        if driver is not None and driver.poll() is None:
            driver.terminate()
            driver.wait()
        stop_group(worker)
        try:
            rabbitmqctl("delete_vhost", vhost)
        except subprocess.CalledProcessError as error:
            log(f"could not delete vhost {vhost}: {error.stderr}")
        os.close(log_fd)
        out_path.unlink(missing_ok=True)
        if ok:
            os.unlink(log_name)
        else:
            tail = Path(log_name).read_text(errors="replace")[-3000:]
            log(f"worker log kept at {log_name}; last lines:\n{tail}")

    return {
        "system": system_name,
        "settings": system.settings,
        "versions": result.pop("versions"),
        "n": result.pop("n"),
        "runs_wps": result.pop("runs_wps"),
        "wps_median": result.pop("wps_median"),
        "steps_per_s_median": result.pop("steps_per_s_median"),
        "lone_ms_median": result.pop("lone_ms_median"),
        "lone_ms_p99": result.pop("lone_ms_p99"),
        "cpu_ms_per_workflow": result.pop("cpu_ms_per_workflow"),
        **result,
        "worker_command": " ".join(system.worker),
        "cpus": CPUS,
        "python": sys.version.split()[0],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Benchmark a peer workflow system (see benchmarks/peers/README.md)."
    )
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("--n", type=int, default=2000, help="workflows per throughput run")
    parser.add_argument("--runs", type=int, default=3, help="throughput runs")
    parser.add_argument("--lone", type=int, default=200, help="sequential lone workflows")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up workflows")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a run")
    parser.add_argument("--json", help="write the result to this file")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter used to create the peer virtualenv"
    )
    args = parser.parse_args()
    if args.n < 1 or args.runs < 1 or args.lone < 0 or args.warmup < 1:
        parser.error("--n, --runs and --warmup must be >= 1, --lone >= 0")

    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    log(f"{args.system}: {SYSTEMS[args.system].settings}")
    try:
        result = run(args.system, args)
    except KeyboardInterrupt:
        sys.exit("interrupted; worker stopped and vhost deleted")
    lone = (
        f"lone median {result['lone_ms_median']:.2f} ms, p99 {result['lone_ms_p99']:.2f} ms"
        if result["lone_ms_median"] is not None
        else "no lone test"
    )
    log(
        f"{args.system}: median {result['wps_median']:.0f} wf/s"
        f" ({result['steps_per_s_median']:.0f} steps/s) over {result['runs_wps']},"
        f" {lone}, worker CPU {result['cpu_ms_per_workflow']:.2f} ms/wf"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
