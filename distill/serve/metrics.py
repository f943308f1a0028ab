"""The gateway's Prometheus metrics (prometheus-client), served as text at ``GET /metrics``.

    curl -s 127.0.0.1:8088/metrics | grep distill_

Each gateway holds its own registry, so several gateways in one process (tests, notebooks) never share counts.
The per-request series are bound once per label set (``request_done``): ``labels()`` takes the metric's lock and
builds the label tuple every time, which is a measurable share of a kept request's CPU.
publish writes a Grafana dashboard over these metrics (``dashboard``, publish/grafana.json); its queries name only
the series this registry exposes (a test checks them against a live ``/metrics``).
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
        # money and coverage: what the student's answers saved against sending every task request to the teacher
        self.coverage = Gauge("distill_live_coverage", "Share of the task's answered requests the student answered "
                              "(since this gateway started)", ["task"], registry=self.registry)
        self.saved = Counter("distill_saved_usd", "Dollars the student's answers saved: each priced at the teacher's "
                             "cost per request in the run's results.json (the cost case)", ["task"],
                             registry=self.registry)
        self.teacher_price = Gauge("distill_teacher_price_usd", "The teacher's cost of one task request, as the "
                                   "run's cost case priced it (results.json cost.teacher_usd_per_1k / 1000)",
                                   ["task"], registry=self.registry)
        self.budget_spent = Gauge("distill_teacher_budget_spent_usd", "Teacher spend of the gateway (every replica "
                                  "on the store) this UTC day, reservations in flight included (with a cap)", [],
                                  registry=self.registry)
        self.budget_cap = Gauge("distill_teacher_budget_usd_per_day", "serve.teacher_budget_usd_per_day (-1: no "
                                "cap)", [], registry=self.registry)
        self.cache_lookups = Gauge("distill_cache_lookups", "Cache lookups by task, cache (exact, semantic) and "
                                   "result (hit, miss), every replica on the store", ["task", "cache", "result"],
                                   registry=self.registry)
        self._answered: dict[str, list[int]] = {}  # task -> [answered, by the student]
        self._children: dict[tuple, tuple] = {}  # (task, route, reason, status) -> (requests child, latency child)
        self._coverage: dict[str, object] = {}   # task -> its coverage child

    def request_done(self, task: str, route: str, reason: str, status: int, seconds: float) -> None:
        """One chat request answered: counted by task/route/reason/status, its latency in the route's histogram."""
        key = (task, route, reason, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(task, route, reason, str(status)),
                                              self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def answered(self, task: str, route: str, teacher_price: float | None) -> None:
        """One task request answered (HTTP 200) by ``route``: live coverage, and the money a student answer saved."""
        counts = self._answered.get(task)
        if counts is None:
            counts = self._answered[task] = [0, 0]
            self._coverage[task] = self.coverage.labels(task)
        counts[0] += 1
        if route == "student":
            counts[1] += 1
            if teacher_price:
                self.saved.labels(task).inc(teacher_price)
        self._coverage[task].set(counts[1] / counts[0])

    def cache_counts(self, counters: dict[str, float]) -> None:
        """The store's ``cache.<exact|semantic>.<hit|miss>.<task>`` counters as gauges."""
        for name, value in counters.items():
            parts = name.split(".", 3)
            if len(parts) == 4 and parts[0] == "cache":
                self.cache_lookups.labels(parts[3], parts[1], parts[2]).set(value)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _panel(pid: int, title: str, kind: str, exprs: list[tuple[str, str]], x: int, y: int, unit: str) -> dict:
    return {"id": pid, "type": kind, "title": title, "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {},
            "targets": [{"refId": chr(65 + i), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for i, (expr, legend) in enumerate(exprs)]}


def dashboard(title: str) -> dict:
    """A Grafana dashboard (JSON model) over the gateway's metrics, filtered by a ``task`` variable."""
    t = 'task=~"$task"'
    panels = [
        ("Requests per second by route", "timeseries",
         [(f"sum by (route) (rate(distill_requests_total{{{t}}}[5m]))", "{{route}}")], "reqps"),
        ("Live coverage (share answered by the student)", "timeseries",
         [(f"distill_live_coverage{{{t}}}", "{{task}}")], "percentunit"),
        ("Money saved vs the teacher on every request", "stat",
         [(f"sum(distill_saved_usd_total{{{t}}})", "saved")], "currencyUSD"),
        ("Teacher spend", "timeseries",
         [(f"sum by (task) (increase(distill_teacher_spend_usd_total{{{t}}}[1h]))", "{{task}} per hour"),
          ("distill_teacher_budget_spent_usd", "today (every replica)"),
          ("distill_teacher_budget_usd_per_day", "daily cap")], "currencyUSD"),
        ("Latency p50 / p99 by route", "timeseries",
         [("histogram_quantile(0.5, sum by (le, route) (rate(distill_request_latency_seconds_bucket[5m])))",
           "p50 {{route}}"),
          ("histogram_quantile(0.99, sum by (le, route) (rate(distill_request_latency_seconds_bucket[5m])))",
           "p99 {{route}}")], "s"),
        ("Fallback reasons", "timeseries",
         [(f'sum by (reason) (rate(distill_requests_total{{{t}, route="teacher"}}[5m]))', "{{reason}}")], "reqps"),
        ("Teacher calls by result", "timeseries",
         [(f"sum by (result) (rate(distill_teacher_calls_total{{{t}}}[5m]))", "{{result}}")], "reqps"),
        ("Live agreement with the teacher (shadow)", "timeseries",
         [(f'distill_live_agreement{{{t}, field="_all", bound="value"}}', "{{task}}"),
          (f'distill_live_agreement{{{t}, field="_all", bound="low"}}', "{{task}} low")], "percentunit"),
        ("Drift alarms and student circuit", "timeseries",
         [(f"distill_drift_alarm{{{t}}}", "drift {{kind}}"),
          (f"distill_student_circuit_closed{{{t}}}", "circuit closed")], "none"),
        ("Cache hit rate", "timeseries",
         [(f'sum by (cache) (distill_cache_lookups{{{t}, result="hit"}}) / sum by (cache) '
           f"(distill_cache_lookups{{{t}}})", "{{cache}}")], "percentunit"),
    ]
    return {"title": title, "uid": None, "schemaVersion": 39, "version": 1, "editable": True,
            "tags": ["distill"], "timezone": "utc", "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
                {"name": "task", "type": "query", "label": "task", "includeAll": True, "multi": True,
                 "datasource": {"type": "prometheus", "uid": "${datasource}"},
                 "query": "label_values(distill_requests_total, task)", "refresh": 2}]},
            "annotations": {"list": []},
            "panels": [_panel(i + 1, title, kind, exprs, 12 * (i % 2), 8 * (i // 2), unit)
                       for i, (title, kind, exprs, unit) in enumerate(panels)]}
