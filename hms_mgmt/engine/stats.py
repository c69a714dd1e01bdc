"""The dashboard's overview figures, read from the engine's Prometheus counters (nothing is
counted twice, and nothing is added to the engine's commit path).

Every few seconds (and at each request) the totals of ``hms_workflows_started_total`` and
``hms_workflows_finished_total`` (by status; ``hms_workflows_refailed_total`` counts as
failed) are sampled at the start of each minute; a minute's figures are the difference to
the next minute's sample. Step durations (p50/p95) are estimated from the
``hms_step_duration_seconds`` histogram since the engine started, as Prometheus's
``histogram_quantile`` does (linear within a bucket).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from hms_mgmt.metrics import EngineMetrics

MINUTES = 60
KINDS = ("started", "succeeded", "failed", "cancelled", "compensated")


class Stats:
    def __init__(self, metrics: EngineMetrics) -> None:
        self.metrics = metrics
        self._samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=MINUTES + 1)

    def totals(self) -> dict[str, float]:
        found = dict.fromkeys(KINDS, 0.0)
        for family in (self.metrics.started, self.metrics.finished, self.metrics.refailed):
            for metric in family.collect():
                for sample in metric.samples:
                    if not sample.name.endswith("_total"):
                        continue
                    if sample.name.endswith("started_total"):
                        found["started"] += sample.value
                    elif sample.name.endswith("refailed_total"):
                        found["failed"] += sample.value
                    elif sample.labels.get("status") in found:
                        found[sample.labels["status"]] += sample.value
        return found

    def tick(self, now: float) -> None:
        """Sample the totals once at the start of each minute (the first call: now)."""
        minute = now - now % 60
        if not self._samples or self._samples[-1][0] < minute:
            self._samples.append((minute, self.totals()))

    def per_minute(self, now: float) -> list[dict[str, Any]]:
        """The last hour's minutes (those the engine has been up for), oldest first; the
        current minute so far last."""
        self.tick(now)
        samples = list(self._samples)
        ends = [totals for _, totals in samples[1:]] + [self.totals()]
        rows = []
        for (minute, before), after in zip(samples, ends, strict=True):
            rows.append({"at": minute, **{k: round(after[k] - before[k]) for k in KINDS}})
        return rows[-MINUTES:]

    def steps(self) -> list[dict[str, Any]]:
        """Per (workflow, step): runs finished and p50/p95 of their duration, slowest first."""
        buckets: dict[tuple[str, str], dict[float, float]] = {}
        for metric in self.metrics.step_duration.collect():
            for sample in metric.samples:
                if not sample.name.endswith("_bucket"):
                    continue
                key = (sample.labels["workflow"], sample.labels["step"])
                le = float(sample.labels["le"])
                into = buckets.setdefault(key, {})
                into[le] = into.get(le, 0.0) + sample.value  # summed over outcomes
        rows = []
        for (workflow, step), counts in buckets.items():
            ordered = sorted(counts.items())
            total = ordered[-1][1] if ordered else 0.0
            if total <= 0:
                continue
            rows.append(
                {
                    "workflow": workflow,
                    "step": step,
                    "runs": round(total),
                    "p50": _quantile(0.5, ordered),
                    "p95": _quantile(0.95, ordered),
                }
            )
        return sorted(rows, key=lambda r: -(r["p95"] or 0.0))


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile``: cumulative (upper bound, count) pairs, +Inf last."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bucket: its bound, as Prometheus does
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return None
