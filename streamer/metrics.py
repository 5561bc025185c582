"""Prometheus metrics for an engine (``serve --metrics HOST:PORT``).

Design: nothing new on the hot path but two histogram observations. Per-stream counters, fps, queue
depth, memory span and state, and the engine's snapshot and RSS figures, are read at scrape time from
what `Engine.status` already keeps, by a custom collector (`EngineCollector`) registered in a registry
of our own (not prometheus-client's global one). Question latency (from arrival at the server's socket)
and model step time are histograms the engine observes (`Engine.metrics`); requests in flight are the
server's own count, read at scrape time. The endpoint is prometheus-client's HTTP server.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

#: The states a stream's ``mixmalmm_stream_state`` gauge has a sample for (1 for the current one).
STATES = ("starting", "running", "reconnecting", "finished", "failed", "stopped")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9108`` for IPv6) -> (host, port); ValueError naming what is wrong."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9108")
    return host, int(port)


def rss_bytes() -> float:
    """This process's resident set size, bytes (Linux: /proc/self/statm)."""
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return float("nan")


class EngineCollector:
    """Reads an engine's (and optionally its server's) figures when Prometheus scrapes."""

    def __init__(self, engine, server=None, webhook=None):
        self.engine = engine
        self.server = server
        self.webhook = webhook

    def describe(self):
        return []  # no samples at registration: status is read at scrape time only

    def collect(self):
        status = self.engine.status()
        labels = ["stream"]
        frames = CounterMetricFamily("mixmalmm_stream_frames", "Frames decoded from the source", labels=labels)
        shots = CounterMetricFamily("mixmalmm_stream_shots", "Shots folded into memory", labels=labels)
        drops = CounterMetricFamily("mixmalmm_stream_drops", "Frames or Shots dropped (live streams behind)",
                                    labels=labels)
        reconnects = CounterMetricFamily("mixmalmm_stream_reconnects", "Reconnections to the source", labels=labels)
        fps_in = GaugeMetricFamily("mixmalmm_stream_fps_in", "Frames per second decoded (last seconds)",
                                   labels=labels)
        fps_out = GaugeMetricFamily("mixmalmm_stream_fps_out", "Shots per second folded into memory", labels=labels)
        depth = GaugeMetricFamily("mixmalmm_stream_queue_depth", "Shots waiting for the model", labels=labels)
        entries = GaugeMetricFamily("mixmalmm_stream_memory_entries", "Entries in the memory bank", labels=labels)
        span = GaugeMetricFamily("mixmalmm_stream_memory_span_seconds",
                                 "Seconds of video the memory covers (end - start)", labels=labels)
        state = GaugeMetricFamily("mixmalmm_stream_state", "1 for the stream's current state",
                                  labels=["stream", "state"])
        for s in status.streams:
            sid = [s.stream]
            frames.add_metric(sid, s.frames)
            shots.add_metric(sid, s.shots)
            drops.add_metric(sid, s.drops)
            reconnects.add_metric(sid, s.reconnects)
            fps_in.add_metric(sid, s.fps_in)
            fps_out.add_metric(sid, s.fps_out)
            depth.add_metric(sid, s.queue_depth)
            entries.add_metric(sid, s.memory_entries)
            covered = s.span_end_s - s.span_start_s if s.span_start_s is not None and s.span_end_s is not None else 0.0
            span.add_metric(sid, covered)
            for name in STATES if s.state in STATES else (*STATES, s.state):
                state.add_metric([s.stream, name], 1.0 if name == s.state else 0.0)
        alerts = CounterMetricFamily("mixmalmm_alerts", "Alert events sent by standing questions",
                                     labels=["stream", "question"])
        held_off = CounterMetricFamily("mixmalmm_alerts_suppressed", "Alerts kept back by a hold-off",
                                       labels=["stream", "question"])
        for stream in self.engine.streams():
            for q in list(stream.standing.values()):
                if q.alert is not None:
                    alerts.add_metric([stream.id, q.question_id], q.alert.alerts)
                    held_off.add_metric([stream.id, q.question_id], q.alert.suppressed)
        yield from (frames, shots, drops, reconnects, fps_in, fps_out, depth, entries, span, state, alerts, held_off)
        e = self.engine
        if self.webhook is not None:
            w = self.webhook.stats
            for name, what, value in (("sent", "Alerts the webhook accepted", w.sent),
                                      ("failed", "Alerts not delivered after every attempt", w.failed),
                                      ("dropped", "Alerts dropped from a full webhook queue", w.dropped)):
                yield CounterMetricFamily(f"mixmalmm_webhook_{name}", what, value=value)
        yield GaugeMetricFamily("mixmalmm_streams", "Streams in the engine", value=len(status.streams))
        yield CounterMetricFamily("mixmalmm_questions_answered", "Questions answered",
                                  value=status.engine.questions_answered)
        if self.server is not None:
            yield GaugeMetricFamily("mixmalmm_requests_in_flight", "Requests accepted, not yet answered",
                                    value=self.server.stats()["in_flight"])
        yield CounterMetricFamily("mixmalmm_snapshots_written", "Snapshot files written", value=e.snapshots_written)
        yield CounterMetricFamily("mixmalmm_snapshot_failures", "Snapshot writes that failed",
                                  value=e.snapshot_failures)
        last = e.last_snapshot_time
        yield GaugeMetricFamily("mixmalmm_snapshot_age_seconds",
                                "Seconds since the last good snapshot write (NaN: none yet)",
                                value=time.time() - last if last is not None else float("nan"))
        yield GaugeMetricFamily("mixmalmm_process_resident_memory_bytes", "Resident set size of the process",
                                value=rss_bytes())
        yield GaugeMetricFamily("mixmalmm_uptime_seconds", "Seconds since the engine was made",
                                value=status.engine.uptime_s)


class EngineMetrics:
    """The registry, the two histograms the engine observes, and the HTTP endpoint.

    ``EngineMetrics(engine, server).serve("127.0.0.1", 9108)``; ``stop()`` closes the endpoint and
    detaches it from the engine.
    """

    def __init__(self, engine, server=None, webhook=None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.question_latency = Histogram(
            "mixmalmm_question_latency_seconds", "Seconds from a question's arrival to its answer",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.step_time = Histogram("mixmalmm_model_step_seconds", "Seconds per model step (a batch of Shots)",
                                   buckets=STEP_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(engine, server, webhook))
        self.engine = engine
        self._httpd = None
        self._thread = None
        self.address: tuple[str, int] | None = None
        engine.metrics = self

    def observe_question(self, seconds: float) -> None:
        self.question_latency.observe(seconds)

    def observe_step(self, seconds: float) -> None:
        self.step_time.observe(seconds)

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Start the HTTP endpoint (port 0: a free one); returns the bound (host, port). OSError: not bound."""
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.address = (host, self._httpd.server_address[1])
        return self.address

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self.engine.metrics is self:
            self.engine.metrics = None
