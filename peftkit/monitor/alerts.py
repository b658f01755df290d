"""Where alerts go: a JSON-lines file, a webhook (POST, retried with exponential backoff), standard output when
neither is given; an alert the webhook cannot take is appended to a dead-letter file instead of being lost.

Exactly once in the alerts file: an alert is first saved in the state's outbox (with the input offset), then
appended, then removed from the outbox. After a crash, ``already_written`` finds the outbox alerts that reached
the file before the crash (by their ``id``), so they are not appended twice. A webhook cannot tell us whether a
request that was cut off arrived, so a retried POST carries the alert's id as ``Idempotency-Key``: receivers that
must not see an alert twice de-duplicate on it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RETRY_STATUS = {408, 425, 429}  # and every 5xx


@dataclass
class Delivery:
    alerts: Path | None = None
    webhook: str | None = None
    dead_letter: Path | None = None
    retries: int = 5
    backoff: float = 0.5  # seconds before the first retry; doubled each time, at most 60
    timeout: float = 10.0

    def __post_init__(self) -> None:
        self.client = None
        self.dead = 0

    def already_written(self, ids: set[str]) -> set[str]:
        """The ids among ``ids`` already in the alerts file; a last line cut off by a crash is removed first."""
        if self.alerts is None or not self.alerts.exists() or not ids:
            return set()
        _drop_partial_last_line(self.alerts)
        found = set()
        with open(self.alerts, encoding="utf-8") as handle:
            for line in handle:
                try:
                    alert_id = json.loads(line).get("id")
                except (json.JSONDecodeError, AttributeError):
                    continue
                if alert_id in ids:
                    found.add(alert_id)
        return found

    def deliver(self, alert: dict, in_file: bool = False) -> None:
        if self.alerts is not None and not in_file:
            append_line(self.alerts, alert)
        if self.webhook is not None:
            error = self._post(alert)
            if error is not None:
                self.dead += 1
                print(f"monitor: alert {alert['id']} not delivered to {self.webhook} ({error}); written to "
                      f"{self.dead_letter}", file=sys.stderr)
                append_line(self.dead_letter, {"alert": alert, "webhook": self.webhook, "error": error,
                                               "attempts": self.retries + 1, "failed_at": time.time()})
        if self.alerts is None and self.webhook is None:
            print(json.dumps(alert, ensure_ascii=False), flush=True)

    def _post(self, alert: dict) -> str | None:
        """None once the webhook took the alert (2xx), else why it failed for good."""
        import httpx

        if self.client is None:
            self.client = httpx.Client(timeout=self.timeout)
        error = "not tried"
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(60.0, self.backoff * 2 ** (attempt - 1))
                print(f"monitor: webhook {self.webhook}: {error}; retry {attempt} of {self.retries} in {delay:g} s",
                      file=sys.stderr, flush=True)
                time.sleep(delay)
            try:
                answer = self.client.post(self.webhook, json=alert, headers={"Idempotency-Key": alert["id"]})
            except httpx.HTTPError as err:  # refused, reset, timed out: worth another try
                error = f"{type(err).__name__}: {err}"
                continue
            if answer.is_success:
                return None
            error = f"HTTP {answer.status_code}"
            if answer.status_code < 500 and answer.status_code not in RETRY_STATUS:
                return error  # the receiver refuses this alert: retrying will not help
        return error

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def append_line(path: Path, data: dict) -> None:
    """Append one JSON line and make it durable before returning (the caller then forgets the alert)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(data, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _drop_partial_last_line(path: Path) -> None:
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        handle.truncate(data.rfind(b"\n") + 1)
