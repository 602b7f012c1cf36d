"""Prometheus metrics: per-stage latency histograms, instance counters, jobs by state."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


class _JobStateCollector:
    def __init__(self, jobs) -> None:
        self.jobs = jobs

    def collect(self):
        gauge = GaugeMetricFamily("lungscreen_jobs", "Jobs by state", labels=["state"])
        for state, n in self.jobs.count_by_state().items():
            gauge.add_metric([state], n)
        yield gauge


class Metrics:
    def __init__(self, jobs) -> None:
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "lungscreen_stage_seconds", "Time spent per pipeline stage", ["stage"],
            buckets=STAGE_BUCKETS, registry=self.registry,
        )
        self.instances_received = Counter(
            "lungscreen_instances_received", "CT instances stored", registry=self.registry
        )
        self.instances_rejected = Counter(
            "lungscreen_instances_rejected", "Instances refused or rejected", registry=self.registry
        )
        self.registry.register(_JobStateCollector(jobs))

    def render(self) -> bytes:
        return generate_latest(self.registry)
