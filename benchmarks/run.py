"""HMS-MGMT against Celery, Dramatiq and taskiq, on the grant-shaped workload, in one run.

    .venv/bin/python benchmarks/run.py [--n 2000] [--runs 3] [--lone 200] [--scale 100000]
                                       [--systems hms,celery,dramatiq,dramatiq-confirms,taskiq]
                                       [--json benchmarks/results/latest.json]

Each system runs on its own, one after the other, on the local RabbitMQ (a fresh vhost
each), so they never compete for the two cores. HMS-MGMT runs through its engine daemon
and one step-service process (``benchmarks/hms.py``); each peer in its own virtualenv
from PyPI (``benchmarks/peers/``). With ``--scale`` HMS-MGMT also runs once with that
many workflows started at once, to compare its throughput with the small run.
Prints a table and writes the figures, with ratios, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS = ["celery", "dramatiq", "dramatiq-confirms", "taskiq"]


def run_system(system: str, n: int, runs: int, lone: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        if system == "hms":
            command = [sys.executable, str(HERE / "hms.py")]
        else:
            command = [sys.executable, str(HERE / "peers" / "run_peer.py"), system]
        command += ["--n", str(n), "--runs", str(runs), "--lone", str(lone), "--json", out.name]
        print(f"--- {system}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True)
        result: dict[str, Any] = json.loads(Path(out.name).read_text())
        return result


def machine_state() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "rabbitmq": subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True
        ).stdout.strip(),
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    hms = results.get("hms")
    lines = [
        "| system | workflows/s | steps/s | lone ms (median / p99) | CPU ms per workflow | HMS-MGMT is |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        cpu = r.get("cpu_ms_per_workflow")
        ratio = (
            ""
            if hms is None or name == "hms"
            else f"{hms['wps_median'] / r['wps_median']:.1f}x faster"
        )
        lone = f"{r['lone_ms_median']:.1f} / {r['lone_ms_p99']:.1f}"
        if "execute_ms_median" in r:  # HMS-MGMT: start + wait, then execute (one round trip)
            lone += f"; execute {r['execute_ms_median']:.1f} / {r['execute_ms_p99']:.1f}"
        lines.append(
            f"| {name} | {r['wps_median']:.0f} | {r['steps_per_s_median']:.0f} | {lone} | "
            f"{'' if cpu is None else f'{cpu:.2f}'} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lone", type=int, default=200)
    parser.add_argument("--scale", type=int, default=0, help="also run HMS-MGMT once with this N")
    parser.add_argument("--systems", default=",".join(["hms", *PEERS]))
    parser.add_argument("--json", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args()
    state = machine_state()
    results: dict[str, dict[str, Any]] = {}
    for system in args.systems.split(","):
        results[system] = run_system(system, args.n, args.runs, args.lone)
    scale = None
    if args.scale and "hms" in results:
        scale = run_system("hms", args.scale, 1, 20)
    summary: dict[str, Any] = {"machine": state, "n": args.n, "results": results}
    if "hms" in results:
        hms = results["hms"]
        summary["ratios"] = {
            name: {
                "throughput": round(hms["wps_median"] / r["wps_median"], 2),
                "lone_latency": round(r["lone_ms_median"] / hms["lone_ms_median"], 2),
            }
            for name, r in results.items()
            if name != "hms"
        }
        summary["engine_peak_rss_mb"] = hms.get("engine_peak_rss_mb")
    if scale is not None:
        summary["scale"] = {
            "n": args.scale,
            "wps": scale["wps_median"],
            "engine_peak_rss_mb": scale.get("engine_peak_rss_mb"),
            "vs_small_run": round(scale["wps_median"] / results["hms"]["wps_median"], 3),
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    print()
    print(
        f"Grant-shaped workflows (4 steps), N = {args.n}, median of {args.runs} runs; {state['when']},"
        f" {state['cpus']} cores, load before {state['load_average_before']}"
    )
    print(table(results))
    if scale is not None:
        s = summary["scale"]
        print(
            f"\nHMS-MGMT with N = {s['n']}: {s['wps']:.0f} workflows/s "
            f"({s['vs_small_run']:.0%} of the N = {args.n} figure), "
            f"engine peak RSS {s['engine_peak_rss_mb']} MB"
        )
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
