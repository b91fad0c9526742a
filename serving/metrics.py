"""Prometheus metrics for the server, in a registry of their own (several servers can live in one process).

Engine-side numbers (running, waiting, KV pages, compiles) come from the snapshot the engine thread
takes after each step, so a scrape never touches the engine. Latencies are observed on the event loop
as outputs arrive.
"""

from __future__ import annotations

import collections
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCounters:
    """Cumulative engine counters, read from the step snapshot at scrape time (the engine owns the counts)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats
        for name, doc, value in (
            ("jaxinfer_prefix_cache_queries", "prompt tokens looked up in the prefix cache", s.prefix_cache_queries),
            ("jaxinfer_prefix_cache_hits", "prompt tokens found in the prefix cache", s.prefix_cache_hits),
            ("jaxinfer_preemptions", "sequences preempted for lack of KV pages", s.preemptions),
            ("jaxinfer_spec_decode_draft_tokens", "speculative decoding: draft tokens proposed", s.spec_draft_tokens),
            ("jaxinfer_spec_decode_accepted_tokens", "speculative decoding: draft tokens accepted",
             s.spec_accepted_tokens),
            ("jaxinfer_spec_decode_off_steps", "speculative decoding: steps without drafts because more requests ran "
             "than disable_by_batch_size", s.spec_off_steps),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        if s.spec_accepted_per_position:
            proposed = CounterMetricFamily("jaxinfer_spec_decode_drafts_per_position",
                                           "speculative decoding: drafts proposed at each draft position (0: first)",
                                           labels=["position"])
            accepted = CounterMetricFamily("jaxinfer_spec_decode_accepted_per_position",
                                           "speculative decoding: drafts accepted at each draft position (0: first)",
                                           labels=["position"])
            for j, (p, a) in enumerate(s.spec_accepted_per_position):
                proposed.add_metric([str(j)], p)
                accepted.add_metric([str(j)], a)
            yield proposed
            yield accepted


def device_memory_bytes() -> float:
    """Bytes in use on this process's devices: the runtime's count where it keeps one, else the live arrays'."""
    import jax

    devices = jax.local_devices()
    stats = [d.memory_stats() for d in devices]
    if all(st and "bytes_in_use" in st for st in stats):
        return float(sum(st["bytes_in_use"] for st in stats))
    return float(sum(a.nbytes for a in jax.live_arrays()))


class Metrics:
    def __init__(self, engine):
        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.requests = Counter("jaxinfer_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        st = lambda name: (lambda: getattr(engine.stats, name))  # noqa: E731
        Gauge("jaxinfer_queue_length", "requests admitted but not started", registry=r).set_function(
            lambda: engine.num_queued)
        Gauge("jaxinfer_running_requests", "sequences running in the engine", registry=r).set_function(st("running"))
        Gauge("jaxinfer_waiting_requests", "sequences waiting in the engine", registry=r).set_function(st("waiting"))
        Gauge("jaxinfer_kv_pages_used", "KV-cache pages in use", registry=r).set_function(st("pages_used"))
        Gauge("jaxinfer_kv_pages_total", "KV-cache pages in all", registry=r).set_function(st("pages_total"))
        Gauge("jaxinfer_kv_pages_cached", "KV-cache pages holding a reusable prefix (in use or not)",
              registry=r).set_function(st("pages_cached"))
        Gauge("jaxinfer_prefix_cache_hit_rate", "prompt tokens found in the prefix cache / prompt tokens looked up, "
              "since start", registry=r).set_function(st("prefix_cache_hit_rate"))
        r.register(_EngineCounters(engine))
        Gauge("jaxinfer_compiles_since_ready", "XLA compilations after warm-up (should stay 0)",
              registry=r).set_function(st("compiles_since_ready"))
        Gauge("jaxinfer_ready", "1 when the server accepts requests", registry=r).set_function(
            lambda: float(engine.is_ready))
        Gauge("jaxinfer_device_memory_bytes", "device memory in use (the runtime's own count on a GPU or TPU; on a "
              "CPU, the bytes of the live jax arrays, less a KV cache donated to a step running at that moment)",
              registry=r).set_function(device_memory_bytes)
        Gauge("jaxinfer_tokens_per_second", "generated tokens per second over the last 10 s",
              registry=r).set_function(self._tokens_per_second)
        self.ttft = Histogram("jaxinfer_time_to_first_token_seconds", "arrival to first output token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("jaxinfer_inter_token_latency_seconds", "time between output tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.generated = Counter("jaxinfer_generation_tokens", "output tokens generated", registry=r)
        self.prompt_tokens = Counter("jaxinfer_prompt_tokens", "prompt tokens processed", registry=r)
        self._seen: dict[str, float | None] = {}  # request id -> time of its last token (None: none yet)
        self._recent: collections.deque = collections.deque()  # (time, tokens)

    def request_done(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def on_output(self, out) -> None:
        """One DELTA RequestOutput (the server's kind): its token ids are the ones new since the last output."""
        now = time.monotonic()
        new = sum(len(c.token_ids) for c in out.outputs)
        last = self._seen.get(out.request_id)
        if out.request_id not in self._seen:
            self.prompt_tokens.inc(len(out.prompt_token_ids))
        if last is None and new > 0 and out.metrics is not None and out.metrics.ttft is not None:
            self.ttft.observe(out.metrics.ttft)  # with the request's first tokens
        if new > 0:
            if last is not None:
                self.itl.observe((now - last) / new)
            self.generated.inc(new)
            self._recent.append((now, new))
        if out.finished:
            self._seen.pop(out.request_id, None)
        else:
            self._seen[out.request_id] = now if new > 0 else last

    def _tokens_per_second(self) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / 10.0

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
