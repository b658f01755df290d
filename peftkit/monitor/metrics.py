"""``/metrics`` of ``peftkit monitor --listen HOST:PORT`` (Prometheus text format, prometheus-client's server)."""

from __future__ import annotations

import time


class MonitorMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.records = Counter("peftkit_monitor_records", "records classified", registry=self.registry)
        self.malformed = Gauge("peftkit_monitor_malformed_lines", "malformed lines skipped (since the state began)",
                               registry=self.registry)
        self.rate = Gauge("peftkit_monitor_records_per_second", "records classified per second over the last batch",
                          registry=self.registry)
        self.lag_bytes = Gauge("peftkit_monitor_lag_bytes", "bytes of the input file not read yet", registry=self.registry)
        self.lag_seconds = Gauge("peftkit_monitor_lag_seconds", "now minus the time of the newest record classified",
                                 registry=self.registry)
        self.alerts = Counter("peftkit_monitor_alerts", "alerts raised", ["rule"], registry=self.registry)
        self.dead = Gauge("peftkit_monitor_dead_letters", "alerts the webhook did not take (dead-letter file)",
                          registry=self.registry)
        self.server = None

    def listen(self, address: str) -> None:
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            from .stream import MonitorError

            raise MonitorError(f"--listen {address!r}: give HOST:PORT, e.g. 127.0.0.1:9108")
        self.server, _ = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)

    def batch(self, records: int, seconds: float, lag_bytes: int | None, monitor) -> None:
        self.records.inc(records)
        self.rate.set(records / seconds if seconds > 0 else 0.0)
        self.malformed.set(monitor.totals.malformed)
        self.dead.set(monitor.delivery.dead)
        if lag_bytes is not None:
            self.lag_bytes.set(lag_bytes)
        if monitor.newest_time is not None:
            self.lag_seconds.set(max(0.0, time.time() - monitor.newest_time))

    def idle(self, lag_bytes: int | None) -> None:
        self.rate.set(0.0)
        if lag_bytes is not None:
            self.lag_bytes.set(lag_bytes)

    def alert(self, alert: dict) -> None:
        self.alerts.labels(alert["rule"]).inc()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
