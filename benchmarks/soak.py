"""A soak with retention: does the store's size plateau under steady load?

``python benchmarks/soak.py --rate 200 --minutes 5 --retention 60s [--json out.json]`` (from
the repository root, with the project's virtualenv). Starts grant workflows at a steady
rate through the engine daemon and one step service, with ``HMS_RETENTION`` short, and
samples the store's size on disk (file and WAL) every ``--every`` seconds. Without
retention the store grows by about the bytes per workflow times the rate, for ever; with
it, the size should stop growing once the first finished workflows pass the retention.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hms_mgmt  # noqa: E402
from benchmarks.grant_service import payload, service  # noqa: E402
from benchmarks.hms import Daemons, fresh_vhost, rss_mb, with_daemons  # noqa: E402
from hms_mgmt.settings import parse_duration  # noqa: E402


def store_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


async def soak(args: argparse.Namespace, url: str, daemons: Daemons) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    async with hms_mgmt.init(service_name="soak", broker_url=url, request_timeout=120) as client:
        client.definitions.update(service.definitions)
        await client.wait((await client.start("grantApproval", payload(0))).workflow_id, 60)
        began = time.monotonic()
        started = 0
        next_sample = began
        duration = args.minutes * 60
        pending: set[asyncio.Task[Any]] = set()
        while (now := time.monotonic()) < began + duration:
            due = int((now - began) * args.rate)
            while started < due:
                task = asyncio.ensure_future(client.start("grantApproval", payload(started)))
                pending.add(task)
                task.add_done_callback(pending.discard)
                started += 1
            if now >= next_sample:
                size = store_bytes(daemons.db)
                counts = dict(daemons.query("SELECT status, count(*) FROM workflows GROUP BY 1"))
                sample = {
                    "t": round(now - began),
                    "started": started,
                    "store_mb": round(size / 1e6, 1),
                    "workflows_kept": sum(counts.values()),
                    "engine_rss_mb": round(rss_mb(daemons.engine.pid), 1),
                }
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                next_sample += args.every
            await asyncio.sleep(0.005)
        await asyncio.gather(*pending)
    retention = parse_duration(args.retention) or 0.0
    settled = [s for s in samples if s["t"] >= retention + 2 * args.every]
    kept = settled[-1]["workflows_kept"] if settled else samples[-1]["workflows_kept"]
    last = samples[-1]
    return {
        "rate": args.rate,
        "minutes": args.minutes,
        "retention": args.retention,
        "started": started,
        "samples": samples,
        "final_store_mb": last["store_mb"],
        "max_store_mb_after_retention": max((s["store_mb"] for s in settled), default=None),
        "min_store_mb_after_retention": min((s["store_mb"] for s in settled), default=None),
        "bytes_per_kept_workflow": round(last["store_mb"] * 1e6 / max(1, kept)),
        "bytes_per_day_without_retention": round(
            last["store_mb"] * 1e6 / max(1, kept) * args.rate * 86400
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=200.0, help="workflows started per second")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--retention", default="60s")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with fresh_vhost("hms-soak") as url:
        result = with_daemons(
            url,
            "hms-soak-",
            {"HMS_RETENTION": args.retention},
            lambda daemons: soak(args, url, daemons),
        )
    print(
        f"soak: {result['started']} workflows at {args.rate:g}/s for {args.minutes:g} min, "
        f"retention {args.retention}: store {result['min_store_mb_after_retention']}-"
        f"{result['max_store_mb_after_retention']} MB once retention applied, "
        f"{result['bytes_per_kept_workflow']} bytes per workflow kept"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
