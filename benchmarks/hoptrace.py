"""A lone workflow's time, hop by hop, from timestamps taken in each process at each hop.

``python benchmarks/hoptrace.py --count 150 [--env KEY=VALUE]`` (from the repository root,
with the project's virtualenv). Runs lone grant workflows one at a time by ``execute``
(one request), as ``benchmarks/latency.py`` does, with the client, the engine daemon and
the step service each writing a line (wall clock, ns) as a message arrives, a batch
begins, a commit begins and ends, a publish begins and is confirmed, a handler begins and
ends, and the finishing batch acks and reads the state its reply carries. Wrapping is done
from outside (``install``, loaded by ``benchmarks/hoptrace_site/sitecustomize.py`` in the
daemons): the code measured is the code shipped, plus a file write per mark (a few us).

Prints, per hop, how many times a workflow crosses it, the median and p90 of one crossing
and the median times the count; then the commit split into its SQL and the hand-over
around it, and the finishing batch's ack and read. The first 20 workflows warm up and are left out.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(__file__).resolve().parent / "hoptrace_site"
WARM_UP = 20

_out: Any = None


def mark(event: str, detail: str = "") -> None:
    _out.write(f"{time.time_ns()} {event} {detail}\n")


def install() -> None:
    """Wrap the hops of this process (whichever of client, engine and worker it runs)."""
    global _out
    _out = open(  # noqa: SIM115 - open for the life of the process, line-buffered
        Path(os.environ["HOPTRACE_DIR"]) / f"t-{os.getpid()}.log", "a", buffering=1
    )
    import bus_adapters.rabbitmq as rabbitmq
    import hms_mgmt.client as client
    import hms_mgmt.engine.answers as answers
    import hms_mgmt.engine.engine as engine
    import hms_mgmt.engine.intake as intake
    import hms_mgmt.store.sqlite as sqlite
    import hms_mgmt.worker.runtime as runtime

    def on_call(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            mark(label)
            return original(*args, **kwargs)

        setattr(owner, name, wrapped)

    def around(owner: Any, name: str, label: str, detail: Callable[..., str] | None = None) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            said = detail(*args, **kwargs) if detail else ""
            mark(label + ">", said)
            try:
                return await original(*args, **kwargs)
            finally:
                mark(label + "<", said)

        setattr(owner, name, wrapped)

    def routing(_bus: Any, message: Any, **_: Any) -> str:
        key = message.routing_key or ""
        if key.startswith("grantApproval."):
            return "steps"
        return key.split(".")[1] if "." in key else key

    on_call(intake.Intake, "on_request", "in.request")
    on_call(intake.Intake, "on_outcome", "in.outcome")
    around(engine.Engine, "_process", "process")
    around(sqlite.SQLiteStore, "commit", "commit")
    around(answers.Answers, "wake", "wake")
    settle = engine.settle

    async def timed_settle(action: Any) -> None:  # the engine's acks
        mark("ack>")
        try:
            await settle(action)
        finally:
            mark("ack<")

    engine.settle = timed_settle  # type: ignore[assignment]
    around(rabbitmq.RabbitMQBus, "publish", "pub", routing)
    on_call(runtime.Worker, "_on_delivery", "w.delivery")
    around(runtime.Worker, "_run", "w.run")
    on_call(client.Client, "_on_reply", "c.reply")
    write = sqlite.SQLiteStore._write

    def timed_write(self: Any, db: Any, statements: Any) -> None:
        mark("sql>")
        try:
            write(self, db, statements)
        finally:
            mark("sql<")

    sqlite.SQLiteStore._write = timed_write  # type: ignore[method-assign]


Event = tuple[int, str, str, str]  # ns, process, event, detail


def read(folder: Path) -> list[list[Event]]:
    """Every process's marks, in time order, cut into workflows at each client request."""
    events: list[Event] = []
    for path in folder.glob("t-*.log"):
        text = path.read_text()
        role = (
            "engine" if " in.request" in text else "worker" if " w.delivery" in text else "client"
        )
        for line in text.splitlines():
            ns, event, detail = [*line.split(" ", 2), ""][:3]
            events.append((int(ns), role, event, detail))
    events.sort()
    workflows: list[list[Event]] = []
    for event in events:
        if event[1] == "client" and event[2] == "pub>":
            workflows.append([event])
        elif workflows:
            workflows[-1].append(event)
    return workflows[WARM_UP:]


def hops(
    workflows: list[list[Event]], steps: int = 4
) -> tuple[dict[str, list[float]], list[float]]:
    """Each hop's crossings in ms (a hop crossed several times has one entry per crossing)."""
    found: dict[str, list[float]] = collections.defaultdict(list)
    totals = []

    def first(events: list[Event], role: str, name: str, after: int, detail: str = "") -> int:
        """The first mark of this kind at or after ``after`` (with this detail, if given)."""
        return next(
            e[0]
            for e in events
            if e[0] >= after and e[1:3] == (role, name) and (not detail or e[3] == detail)
        )

    for events in workflows:
        t0 = events[0][0]
        replies = [e[0] for e in events if e[1:3] == ("client", "c.reply")]
        try:
            at = first(events, "engine", "in.request", t0)
            found["request: client publish -> engine intake"].append(at - t0)
            for step in range(steps + 1):
                begun = first(events, "engine", "process>", at)
                found["engine: intake -> batch begins"].append(begun - at)
                commit = first(events, "engine", "commit>", begun)
                found["engine: batch begins -> commit (load, apply)"].append(commit - begun)
                done = first(events, "engine", "commit<", commit)
                found["engine: commit"].append(done - commit)
                if step == steps:
                    break
                out = first(events, "engine", "pub>", done, "steps")
                found["engine: commit -> step publish"].append(out - done)
                delivered = first(events, "worker", "w.delivery", out)
                found["broker: step publish -> worker delivery"].append(delivered - out)
                run = first(events, "worker", "w.run>", delivered)
                found["worker: delivery -> handler"].append(run - delivered)
                ran = first(events, "worker", "w.run<", run)
                found["worker: handler"].append(ran - run)
                reported = first(events, "worker", "pub>", ran)
                found["worker: handler -> outcome publish"].append(reported - ran)
                at = first(events, "engine", "in.outcome", reported)
                found["broker: outcome publish -> engine intake"].append(at - reported)
            reply = next(
                e[0]
                for e in events
                if e[0] >= done and e[1:3] == ("engine", "pub>") and e[3] != "steps"
            )
        except StopIteration:  # a mark missing (the run cut short): leave the workflow out
            continue
        found["engine: commit -> reply publish"].append(reply - done)
        found["broker: reply publish -> client"].append(replies[-1] - reply)
        totals.append((replies[-1] - t0) / 1e6)
    return {k: [x / 1e6 for x in v] for k, v in found.items()}, totals


def commit_split(workflows: list[list[Event]]) -> tuple[list[float], list[float]]:
    """Each commit's SQL (ms), and the rest of it: the hand-over to where it runs and back."""
    sql, around = [], []
    for events in workflows:
        for index, (at, role, event, _) in enumerate(events):
            if (role, event) != ("engine", "commit>"):
                continue
            rest = events[index:]
            began = next((e[0] for e in rest if e[2] == "sql>"), None)
            ended = next((e[0] for e in rest if e[2] == "sql<"), None)
            done = next((e[0] for e in rest if e[2] == "commit<"), None)
            if began and ended and done:
                sql.append((ended - began) / 1e6)
                around.append(((began - at) + (done - ended)) / 1e6)
    return sql, around


def last_batch(workflows: list[list[Event]]) -> dict[str, list[float]]:
    """The finishing batch after its commit: its ack, and the wake that reads the state the
    reply carries (ms)."""
    found: dict[str, list[float]] = collections.defaultdict(list)
    for events in workflows:
        marks = [e for e in events if e[1] == "engine"]
        commits = [e[0] for e in marks if e[2] == "commit<"]
        if not commits:
            continue
        after = [e for e in marks if e[0] >= commits[-1]]
        for name in ("ack", "wake"):
            began = next((e[0] for e in after if e[2] == f"{name}>"), None)
            ended = next((e[0] for e in after if e[2] == f"{name}<"), None)
            if began is not None and ended is not None:
                found[name].append((ended - began) / 1e6)
    return found


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(folder: Path) -> str:
    workflows = read(folder)
    found, totals = hops(workflows)
    lines = [
        f"{len(totals)} lone workflows: first request to last reply, median "
        f"{statistics.median(totals):.2f} ms, p90 {p(totals, 0.9):.2f}, p99 {p(totals, 0.99):.2f}",
        "",
        "| hop | per workflow | one crossing, median ms | p90 | median x count |",
        "| --- | --- | --- | --- | --- |",
    ]
    summed = 0.0
    for hop, values in found.items():
        count = len(values) // len(totals)
        median = statistics.median(values)
        summed += median * count
        lines.append(
            f"| {hop} | {count} | {median:.3f} | {p(values, 0.9):.3f} | {median * count:.2f} |"
        )
    lines.append(f"| sum of the medians | | | | {summed:.2f} |")
    sql, around = commit_split(workflows)
    lines.append("")
    lines.append(
        f"commit: its SQL {statistics.median(sql):.3f} ms median ({p(sql, 0.9):.3f} p90); "
        f"the hand-over around it {statistics.median(around):.3f} ({p(around, 0.9):.3f} p90)"
    )
    for name, values in last_batch(workflows).items():
        lines.append(
            f"the finishing batch's {name}: {statistics.median(values):.3f} ms median "
            f"({p(values, 0.9):.3f} p90)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=150)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the daemons")
    parser.add_argument("--keep", type=Path, help="write the marks here (default: a temp folder)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="hoptrace-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["HOPTRACE_DIR"] = str(folder)
    sys.path.insert(0, str(ROOT))
    install()  # this process: the client
    from benchmarks import latency
    from benchmarks.hms import fresh_vhost, with_daemons

    env = dict(item.split("=", 1) for item in args.env)
    env["PYTHONPATH"] = f"{SITE}{os.pathsep}{ROOT}"
    with fresh_vhost("hms-hoptrace") as url:
        with_daemons(
            url,
            "hms-hoptrace-",
            env,
            lambda daemons: latency.measure(url, daemons, args.count, True),
        )
    _out.flush()
    print(report(folder))


if __name__ == "__main__":
    main()
