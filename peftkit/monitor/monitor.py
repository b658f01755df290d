"""The monitor loop: read a batch of lines, classify the valid records in one call, feed every rule's windows,
then save the input offset, the windows and the new alerts (an outbox) in one atomic write, and only then deliver
the alerts.

Why a SIGKILL at any moment neither repeats an alert nor misses a record:
- the offset and the windows are saved together, so a restart resumes at the first line whose effect on the
  windows was not saved; a batch that was being processed is read and classified again, from the same windows,
  and raises the same alerts with the same ids (classification and windows are deterministic);
- an alert leaves the outbox only after it was appended (fsync) to the alerts file; alerts still in the outbox at
  a restart are delivered first, skipping those the file already holds (by id);
- fired alert ids are kept (the last 10,000), and an alert with a known id is never raised twice.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..atomic import write_json
from .alerts import Delivery
from .rules import Rule
from .stream import LineReader, MonitorError, Record, parse_record
from .windows import RuleWindows

STATE_VERSION = 1
KEEP_FIRED = 10_000
#: texts -> one row per text with its "label" and "probabilities" (label -> probability), as peftkit predict prints
Classifier = Callable[[Sequence[str]], list[dict]]


@dataclass
class Options:
    input: str
    rules: list[Rule]
    group_by: str | None = None
    state: Path | None = None
    batch: int = 32
    follow: bool = False
    poll: float = 0.5
    top: int = 3
    idle_exit: float | None = None  # with follow: stop after this many seconds without new lines (tests, cron)


@dataclass
class Totals:
    records: int = 0
    malformed: int = 0
    empty: int = 0
    alerts: int = 0
    extra: dict = field(default_factory=dict)


class Monitor:
    def __init__(self, classify: Classifier, options: Options, delivery: Delivery, metrics=None) -> None:
        self.classify, self.options, self.delivery, self.metrics = classify, options, delivery, metrics
        self.windows = [RuleWindows(i + 1, rule, options.top) for i, rule in enumerate(options.rules)]
        self.totals, self.outbox, self.fired = Totals(), [], []
        self.offset, self.line, self.stop = 0, 0, threading.Event()
        self.newest_time: float | None = None  # of the records classified by this process (for the lag metric)
        self._load()

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path | None:
        return None if self.options.state is None else Path(self.options.state) / "state.json"

    def _load(self) -> None:
        import json

        if self.state_file is None or not self.state_file.exists():
            return
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise MonitorError(f"{self.state_file} cannot be read ({err}); move it away to start over") from None
        saved = {"input": data.get("input", {}).get("path"), "rules": data.get("rules"), "group_by": data.get("group_by")}
        given = {"input": self.options.input, "rules": [r.text for r in self.options.rules], "group_by": self.options.group_by}
        for key in given:
            if saved[key] != given[key]:
                raise MonitorError(f"the state in {self.options.state} was written for {key} {saved[key]!r}, not "
                                   f"{given[key]!r}; give the same {key}, or a new --state folder to start over")
        self.offset, self.line = data["input"]["offset"], data["input"]["line"]
        for windows, saved_windows in zip(self.windows, data["windows"]):
            windows.load(saved_windows)
        self.outbox, self.fired = data["outbox"], data["fired"]
        self.totals = Totals(**data["totals"])

    def _save(self) -> None:
        if self.state_file is None:
            return
        write_json(self.state_file, {
            "version": STATE_VERSION, "input": {"path": self.options.input, "offset": self.offset, "line": self.line},
            "rules": [r.text for r in self.options.rules], "group_by": self.options.group_by,
            "windows": [w.to_dict() for w in self.windows], "outbox": self.outbox, "fired": self.fired,
            "totals": self.totals.__dict__})

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> Totals:
        self._flush_outbox(recovering=True)
        reader = LineReader(self.options.input, self.offset, self.line, self.options.follow)
        last_new, last_batch = time.monotonic(), time.monotonic()
        try:
            while not self.stop.is_set():
                lines = reader.batch(self.options.batch)
                if lines:
                    before = self.totals.records
                    self.process(lines, reader.offset, reader.line)
                    now = time.monotonic()
                    if self.metrics is not None:
                        self.metrics.batch(self.totals.records - before, now - last_batch, reader.lag_bytes, self)
                    last_new = last_batch = now
                    continue
                if reader.done:
                    break
                if self.options.idle_exit is not None and time.monotonic() - last_new > self.options.idle_exit:
                    break
                if self.metrics is not None:
                    self.metrics.idle(reader.lag_bytes)
                self.stop.wait(self.options.poll)
        finally:
            reader.close()
            self.delivery.close()
        return self.totals

    def process(self, lines: list[tuple[int, bytes]], offset: int, line: int) -> None:
        """One batch: classify, feed the windows, save (offset, windows, outbox) atomically, deliver."""
        records: list[Record] = []
        for number, raw in lines:
            parsed = parse_record(number, raw, self.options.group_by)
            if parsed is None:
                self.totals.empty += 1
            elif isinstance(parsed, str):
                self.totals.malformed += 1
                print(f"monitor: {self.options.input} line {number}: skipped, {parsed}", file=sys.stderr)
            else:
                records.append(parsed)
        rows = self.classify([r.text for r in records]) if records else []
        if records:
            self.newest_time = max(self.newest_time or records[0].time, *(r.time for r in records))
        known = set(self.fired) | {a["id"] for a in self.outbox}
        for record, row in zip(records, rows):
            for windows in self.windows:
                for alert in windows.add(record.group, record.line, record.time, row["label"], row["probabilities"],
                                         record.text, record.source):
                    if alert["id"] not in known:
                        known.add(alert["id"])
                        self.outbox.append(alert)
        self.totals.records += len(records)
        self.offset, self.line = offset, line
        self._save()
        self._flush_outbox()

    def _flush_outbox(self, recovering: bool = False) -> None:
        if not self.outbox:
            return
        written = self.delivery.already_written({a["id"] for a in self.outbox}) if recovering else set()
        while self.outbox:
            alert = self.outbox[0]
            self.delivery.deliver(alert, in_file=alert["id"] in written)
            self.outbox.pop(0)
            self.fired.append(alert["id"])
            del self.fired[:-KEEP_FIRED]
            self.totals.alerts += 1
            if self.metrics is not None:
                self.metrics.alert(alert)
            self._save()  # after each alert: a crash now must not deliver this one again


@contextlib.contextmanager
def stop_on_signals(monitor: Monitor) -> Iterator[None]:
    """While inside: SIGTERM / SIGINT end the loop after the current batch (its state saved). The previous
    handlers come back afterwards; outside the main thread nothing changes (signals go to the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: monitor.stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
