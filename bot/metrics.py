"""`/metrics` for `rotor serve`, in Prometheus' text format (prometheus-client).

Everything is read from the state store when Prometheus scrapes, so every replica sharing a
store reports the same rotations: the audit trail is tailed for what happened (rotations by
status, step durations, failures), the active rotations give what waits now (approvals, waits
by reason), and the Slack reporter's cursor gives the delivery backlog. The key-age check
leaves its count of keys past their maximum age in the store; the scheduler's listener records
each job's last run in this process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rotation.engine import Engine
from rotation.store import ACTIVE, RotationRow

KEYS_PAST_MAX_AGE = "metrics:keys-past-max-age:"  # + env: the key-age check's last count
SLACK_SCANNED = "slack:scanned"  # bot.reporter.SCANNED: audit rows delivered up to this id
STEP_SECONDS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)


class RotorMetrics(Collector):
    """The collector, and the registry `/metrics` serves."""

    def __init__(self, engine: Engine, *, slack: bool, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.store = engine.store
        self.slack = slack
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._cursor = 0
        self._rotations: dict[int, tuple[str, str, str]] = {}  # id -> (kind, env, status)
        self._step_seconds = Histogram(
            "rotor_step_duration_seconds", "Time from a step's start to its end.",
            ["kind", "step"], buckets=STEP_SECONDS, registry=None)
        self._failures = Counter(
            "rotor_step_failures", "Steps that failed, by step.", ["kind", "step"],
            registry=None)  # both yielded by collect(), after it read the new audit rows
        self._last_run = Gauge(
            "rotor_scheduler_last_run_timestamp_seconds",
            "When each scheduled job last ran in this process (Unix time).", ["job"],
            registry=self.registry)
        self.registry.register(self)

    def wsgi(self) -> Any:
        return make_wsgi_app(self.registry)

    def scheduler_ran(self, event: Any) -> None:
        """APScheduler listener for EVENT_JOB_EXECUTED and EVENT_JOB_ERROR."""
        self._last_run.labels(event.job_id).set(self.clock())

    # -- read at scrape time ------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return []  # made at scrape time: nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self._tail()
            rotations = GaugeMetricFamily("rotor_rotations", "Rotations by kind, environment "
                                          "and status (failed: active, stopped at a failed step).",
                                          labels=["kind", "env", "status"])
            counts: dict[tuple[str, str, str], int] = {}
            for key in self._rotations.values():
                counts[key] = counts.get(key, 0) + 1
            for (kind, env, status), count in sorted(counts.items()):
                rotations.add_metric([kind, env, status], count)
            histograms = [*self._step_seconds.collect(), *self._failures.collect()]
        yield rotations
        yield from histograms
        yield from self._waiting(self.store.active())
        if self.slack:
            yield from self._slack_backlog()
        keys = GaugeMetricFamily("rotor_iam_keys_past_max_age", "Active IAM access keys older "
                                 "than key_age.max_key_age_days at the last key-age check.",
                                 labels=["env"])
        for env in self.engine.catalogue.environments:
            value = self.store.get_kv(KEYS_PAST_MAX_AGE + env)
            if value is not None:
                keys.add_metric([env], float(value))
        yield keys

    def _tail(self) -> None:
        """Read the audit rows written since the last scrape."""
        while True:
            rows = self.store.audit_rows(after=self._cursor, limit=1000)
            if not rows:
                return
            loaded: dict[int, RotationRow] = {}
            for row in rows:
                self._cursor = row.id
                if row.rotation_id is None:
                    continue
                rotation = loaded.get(row.rotation_id)
                if rotation is None:
                    rotation = loaded[row.rotation_id] = self.store.rotation(row.rotation_id)
                if row.event == "step" and row.step and row.to_status in ("done", "failed"):
                    step = rotation.step(row.step)
                    if row.to_status == "failed":
                        self._failures.labels(rotation.kind, row.step).inc()
                    elif step.started_at is not None and step.finished_at is not None:
                        self._step_seconds.labels(rotation.kind, row.step).observe(
                            max(0.0, step.finished_at - step.started_at))
            for rotation in loaded.values():
                status = rotation.status
                current = rotation.current
                if status == ACTIVE and current is not None and current.status == "failed":
                    status = "failed"
                self._rotations[rotation.id] = (rotation.kind, rotation.env, status)

    def _waiting(self, active: list[RotationRow]) -> Iterator[Metric]:
        now = self.clock()
        approvals = GaugeMetricFamily("rotor_approvals_waiting",
                                      "Steps waiting for a person's decision.")
        oldest = GaugeMetricFamily("rotor_approval_oldest_age_seconds",
                                   "How long the oldest waiting approval has waited.")
        waits = GaugeMetricFamily("rotor_waits", "Steps waiting, by what they wait for.",
                                  labels=["kind", "step", "reason"])
        asked: list[float] = []
        by_reason: dict[tuple[str, str, str], int] = {}
        for rotation in active:
            step = rotation.current
            if step is None:
                continue
            if step.status == "needs-approval" and step.decision is None:
                asked.append(step.gate_requested_at or step.started_at or now)
            elif step.status == "waiting":
                key = (rotation.kind, step.name, step.wait_reason or "")
                by_reason[key] = by_reason.get(key, 0) + 1
        approvals.add_metric([], len(asked))
        oldest.add_metric([], max(0.0, now - min(asked)) if asked else 0.0)
        for key, count in sorted(by_reason.items()):
            waits.add_metric(list(key), count)
        yield approvals
        yield oldest
        yield waits

    def _slack_backlog(self) -> Iterator[Metric]:
        scanned = self.store.get_kv(SLACK_SCANNED)
        pending = self.store.audit_rows(after=int(scanned), limit=10000) if scanned else []
        backlog = GaugeMetricFamily("rotor_slack_backlog", "Audit rows not yet delivered to "
                                    "Slack.")
        lag = GaugeMetricFamily("rotor_slack_lag_seconds", "Age of the oldest audit row not "
                                "yet delivered to Slack.")
        backlog.add_metric([], len(pending))
        lag.add_metric([], max(0.0, self.clock() - pending[0].at) if pending else 0.0)
        yield backlog
        yield lag
