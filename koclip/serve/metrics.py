"""The service's Prometheus metrics (prometheus-client, one registry per app), served at /metrics."""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)

disable_created_metrics()  # no *_created series: they only repeat the start time

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("koclip_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("koclip_request_seconds", "Time to answer a request, by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("koclip_errors", "Requests answered with an error, by kind (the JSON error field)",
                              ["kind"], registry=r)
        self.batch_size = Histogram("koclip_batch_size", "Queries embedded per encoder call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.search_batch_size = Histogram("koclip_search_batch_size", "Queries searched per FAISS call (batching on)",
                                           buckets=BATCH_BUCKETS, registry=r)
        self.index_info = Gauge("koclip_index_info", "1 for each served index version", ["index", "modality", "version"],
                                registry=r)
        self.index_rows = Gauge("koclip_index_rows", "Rows of the served index version", ["index", "modality"], registry=r)
        self.index_swaps = Counter("koclip_index_swaps", "New index versions swapped in while serving",
                                   ["index", "modality"], registry=r)
        self.reload_failures = Gauge("koclip_index_reload_failures", "New index versions refused while serving "
                                     "(unreadable, or another model's); the old version stays served", registry=r)
        self.compiles = Gauge("koclip_encoder_compiles", "Times each jitted encoder was traced (compiled)", ["tower"],
                              registry=r)
        self.ready = Gauge("koclip_ready", "1 once the model is warmed up and every index is loaded", registry=r)

    def set_index(self, served, old=None) -> None:
        if old is not None:
            self.index_info.remove(old.name, old.modality, old.version)
            self.index_swaps.labels(served.name, served.modality).inc()
        self.index_info.labels(served.name, served.modality, served.version).set(1)
        self.index_rows.labels(served.name, served.modality).set(len(served.index))

    def set_compiles(self, counts: dict) -> None:
        for tower, count in counts.items():
            self.compiles.labels(tower).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
