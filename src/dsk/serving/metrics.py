"""Prometheus metrics for `GET /metrics`: requests by status, tokens, queue, batch, TTFT, latency.

Each app has its own registry (several servers can live in one process, e.g. in tests). The
engine's counters are read at scrape time; process memory comes from prometheus_client's
process collector (``process_resident_memory_bytes``).

    $ curl -s localhost:8000/metrics | grep dsk_
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)


class _EngineCollector:
    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        e = self.engine
        yield CounterMetricFamily("dsk_prompt_tokens", "Prompt tokens admitted into the engine.",
                                  value=e.prompt_tokens_total)
        yield CounterMetricFamily("dsk_generated_tokens", "Tokens generated.", value=e.generated_tokens_total)
        yield CounterMetricFamily("dsk_engine_steps", "Scheduler steps run.", value=e.steps)
        yield CounterMetricFamily("dsk_engine_busy_seconds", "Time spent in scheduler steps.", value=e.busy_seconds)
        yield CounterMetricFamily("dsk_engine_forward_seconds", "Time spent in model forward passes.",
                                  value=e.forward_seconds)
        yield CounterMetricFamily("dsk_admitted_requests", "Requests admitted into the running batch.",
                                  value=e.admitted_total)
        yield CounterMetricFamily("dsk_queue_wait_seconds", "Summed time admitted requests waited from arrival "
                                  "to their batch row.", value=e.queue_wait_seconds)
        yield GaugeMetricFamily("dsk_queue_depth", "Requests waiting for a batch slot.", value=e.queue_depth)
        yield GaugeMetricFamily("dsk_running_batch_size", "Sequences in the running batch.", value=e.running)
        yield GaugeMetricFamily("dsk_max_batch_size", "Batch slots (--max-batch-size).", value=e.max_batch_size)
        if e.process_rss_bytes is not None:  # an engine in its own process
            yield GaugeMetricFamily("dsk_engine_process_resident_memory_bytes",
                                    "Resident memory of the engine process (--engine-process).", value=e.process_rss_bytes)
        memory = e.cuda_memory()  # an engine process: its last report
        if memory is not None:
            yield GaugeMetricFamily("dsk_cuda_memory_allocated_bytes", "CUDA memory allocated by torch.",
                                    value=memory[0])
            yield GaugeMetricFamily("dsk_cuda_max_memory_allocated_bytes", "Peak CUDA memory allocated by torch.",
                                    value=memory[1])


class Metrics:
    def __init__(self, engine: Any = None):
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        if engine is not None:
            self.registry.register(_EngineCollector(engine))
        self.requests = Counter("dsk_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
                                registry=self.registry)
        self.ttft = Histogram("dsk_time_to_first_token_seconds", "Time from request to first generated text.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.latency = Histogram("dsk_request_latency_seconds", "Time from request to the last token.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> tuple[str, str]:
        return generate_latest(self.registry).decode("utf-8"), CONTENT_TYPE_LATEST
