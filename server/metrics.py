"""Prometheus metrics: per-stage latency histograms, instance counters, jobs and deliveries by state,
DICOM receivers and their open associations, and remote inference on a Triton server."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


class _StateCountCollector:
    """A gauge by state, counted in the database when scraped."""

    def __init__(self, name: str, documentation: str, count_by_state: Callable[[], dict[str, int]]) -> None:
        self.name, self.documentation, self.count_by_state = name, documentation, count_by_state

    def collect(self):
        gauge = GaugeMetricFamily(self.name, self.documentation, labels=["state"])
        for state, n in self.count_by_state().items():
            gauge.add_metric([state], n)
        yield gauge


class _ReceiverCollector:
    """The DICOM receiver processes running, and the associations open in them, when scraped."""

    def __init__(self, receivers) -> None:
        self.receivers = receivers

    def collect(self):
        yield GaugeMetricFamily("lungscreen_dicom_receivers", "DICOM receiver processes running",
                                value=self.receivers.running)
        yield GaugeMetricFamily("lungscreen_dicom_associations_open", "DICOM connections open in the receivers",
                                value=sum(self.receivers.open_connections))


class Metrics:
    def __init__(self, jobs, outbox, receivers) -> None:
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
        self.registry.register(_StateCountCollector("lungscreen_jobs", "Jobs by state", jobs.count_by_state))
        # A dead delivery is a report the PACS never got: the figure to alert on.
        self.registry.register(
            _StateCountCollector("lungscreen_deliveries", "Reports to destinations by state", outbox.count_by_state)
        )
        self.registry.register(_ReceiverCollector(receivers))
        # Remote inference (Triton): per study, what went over the wire and how it went.
        self.remote_seconds = Histogram(
            "lungscreen_remote_inference_seconds", "Time in requests to the inference server, per study",
            buckets=STAGE_BUCKETS, registry=self.registry,
        )
        self.remote_requests = Counter(
            "lungscreen_remote_inference_requests", "Inference requests answered by the inference server",
            registry=self.registry,
        )
        self.remote_bytes_sent = Counter(
            "lungscreen_remote_inference_bytes_sent", "Bytes of input tensors sent to the inference server",
            registry=self.registry,
        )
        self.remote_retries = Counter(
            "lungscreen_remote_inference_retries", "Inference requests sent again after a timeout or lost connection",
            registry=self.registry,
        )
        self.remote_fallbacks = Counter(
            "lungscreen_remote_inference_fallbacks", "Studies run locally because the inference server was unavailable",
            registry=self.registry,
        )
        self.remote_unavailable = Counter(
            "lungscreen_remote_inference_unavailable", "Study runs put back in the queue to wait for the inference server",
            registry=self.registry,
        )

    def record_inference(self, inference: dict) -> None:
        """Count one study's inference (a ``models.detector.InferenceSite`` as a dict)."""
        self.remote_retries.inc(inference.get("retries", 0))
        if inference.get("where") == "remote":
            self.remote_seconds.observe(inference.get("remote_seconds", 0.0))
            self.remote_requests.inc(inference.get("requests", 0))
            self.remote_bytes_sent.inc(inference.get("bytes_sent", 0))
        elif inference.get("fallback_reason"):
            self.remote_fallbacks.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
