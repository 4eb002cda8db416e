"""Prometheus metrics of the gateway, on their own registry (served over HTTP by --metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tpcluster_requests_total", "Requests by method, model and status code",
                                ["method", "model", "code"], registry=self.registry)
        self.latency = Histogram("tpcluster_request_seconds", "Request latency", ["method", "model"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.queue_depth = Gauge("tpcluster_queue_depth", "Requests waiting for a batch", ["model"], registry=self.registry)
        self.batch_size = Histogram("tpcluster_batch_rows", "Rows per forward", ["model"], registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.tokens = Counter("tpcluster_generated_tokens_total", "Generated tokens", ["model"], registry=self.registry)
        self.tokens_per_second = Gauge("tpcluster_tokens_per_second", "Tokens/s of the last finished generation",
                                       ["model"], registry=self.registry)
        self.draft_proposed = Counter("tpcluster_draft_tokens_proposed_total", "Speculative draft tokens proposed",
                                      ["model"], registry=self.registry)
        self.draft_accepted = Counter("tpcluster_draft_tokens_accepted_total", "Speculative draft tokens accepted",
                                      ["model"], registry=self.registry)
        self.carried_on = Counter("tpcluster_generations_carried_on_total",
                                  "Generate streams that lost their replica and went on on another", ["model"],
                                  registry=self.registry)
        self.prefix_hits = Counter("tpcluster_prefix_hits_total",
                                   "Generations whose prompt started with tokens a kept KV-cache row held (prefix reuse)",
                                   ["model"], registry=self.registry)
        self.prefix_reused_tokens = Counter("tpcluster_prefix_reused_tokens_total",
                                            "Prompt tokens taken from kept KV-cache rows instead of prefilled",
                                            ["model"], registry=self.registry)
        self.ready = Gauge("tpcluster_model_ready", "1 when the model has a ready replica", ["model"], registry=self.registry)

    def serve(self, host: str, port: int):
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server
