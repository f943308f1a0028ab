"""The gateway's Prometheus metrics (prometheus-client), served as text at ``GET /metrics``.

    curl -s 127.0.0.1:8088/metrics | grep distill_

Each gateway holds its own registry, so several gateways in one process (tests, notebooks) never share counts.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: the student answers in milliseconds, a remote teacher in seconds.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Requests by task/route/reason, latency per route, teacher calls and spend, the student circuit; shadow
    calls, live agreement, drift alarms and reloads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("distill_requests", "Chat requests answered, by task, route and reason",
                                ["task", "route", "reason", "status"], registry=self.registry)
        self.latency = Histogram("distill_request_latency_seconds", "Gateway latency of a chat request, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.teacher_calls = Counter("distill_teacher_calls", "Teacher fallbacks, by task and result (paid: sent "
                                     "and billed; ledger: answered from the run's ledger; failed)",
                                     ["task", "result"], registry=self.registry)
        self.teacher_spend = Counter("distill_teacher_spend_usd", "Dollars paid to the teacher by the gateway",
                                     ["task"], registry=self.registry)
        self.student_errors = Counter("distill_student_errors", "Student runtime failures, by kind",
                                      ["task", "kind"], registry=self.registry)
        self.student_up = Gauge("distill_student_circuit_closed", "1 while the student circuit is closed (the "
                                "student is tried), 0 while open", ["task"], registry=self.registry)
        self.in_flight = Gauge("distill_in_flight", "Task requests in flight", ["task"], registry=self.registry)
        # the loop: shadow traffic, live agreement, drift, reloads (distill/serve/shadow.py, drift.py)
        self.shadow_calls = Counter("distill_shadow_calls", "Shadow teacher calls, by task and result (paid, ledger, "
                                    "failed)", ["task", "result"], registry=self.registry)
        self.shadow_dropped = Counter("distill_shadow_dropped", "Shadow requests not sent, by task and why "
                                      "(queue_full, budget)", ["task", "why"], registry=self.registry)
        self.shadow_spend = Counter("distill_shadow_spend_usd", "Dollars paid to the teacher for shadow calls",
                                    ["task"], registry=self.registry)
        self.agreement = Gauge("distill_live_agreement", "Live agreement of the student's kept answers with the "
                               "teacher (shadow comparisons, every replica), per field (_all: every field) with a "
                               "95% Wilson interval", ["task", "field", "bound"], registry=self.registry)
        self.comparisons = Gauge("distill_live_comparisons", "Shadow comparisons behind distill_live_agreement",
                                 ["task"], registry=self.registry)
        self.drift_active = Gauge("distill_drift_alarm", "1 while a drift alarm is active, by task and kind "
                                  "(agreement, answers)", ["task", "kind"], registry=self.registry)
        self.drift_alarms = Counter("distill_drift_alarms", "Drift alarms raised, by task and kind", ["task", "kind"],
                                    registry=self.registry)
        self.reloads = Counter("distill_reloads", "POST /admin/reload, by result (ok, failed)", ["result"],
                               registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
