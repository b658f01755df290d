"""Sliding windows per rule and group, their evaluation, and the alerts they raise (see ``rules`` for the meaning).

The whole state is plain JSON (``to_dict`` / ``from_dict``) so that it is saved with the input offset in one
atomic write: a restart resumes exactly where the last saved batch ended.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .rules import Rule

#: one classified record in a window: [line, time (epoch seconds), label, score of the rule's label, text, source]
Entry = list


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Window:
    """One rule's window over one group's records."""

    entries: deque = field(default_factory=deque)
    seen: int = 0  # records of the group so far (count windows)
    boundary: float | None = None  # the next evaluation time (time windows)
    streak: int = 0  # evaluations in a row on which the condition held

    def to_dict(self) -> dict:
        return {"entries": list(self.entries), "seen": self.seen, "boundary": self.boundary, "streak": self.streak}

    @classmethod
    def from_dict(cls, data: dict) -> "Window":
        return cls(deque(data["entries"]), data["seen"], data["boundary"], data["streak"])


class RuleWindows:
    """The windows of one rule, one per group, and the alerts they raise."""

    def __init__(self, index: int, rule: Rule, top: int) -> None:
        self.index, self.rule, self.top = index, rule, top
        self.groups: dict[str, Window] = {}
        self.earliest = math.inf  # the earliest pending time boundary over all groups (time windows)

    # -- feeding --------------------------------------------------------------------------------------------
    def add(self, group: str, line: int, time: float, label: str, probabilities: dict[str, float], text: str,
            source: Any) -> list[dict]:
        """Take one classified record; the alerts that evaluations caused by it raise."""
        entry = [line, time, label, round(float(probabilities.get(self.rule.label, 0.0)), 6), text[:500], source]
        window = self.groups.setdefault(group, Window())
        if self.rule.by_time:
            alerts = self.advance(time)  # every group's windows that end at or before this record close first
            if window.boundary is None:
                window.boundary = (math.floor(time / self.rule.step) + 1) * self.rule.step
                self.earliest = min(self.earliest, window.boundary)
            window.entries.append(entry)
            return alerts
        window.entries.append(entry)
        window.seen += 1
        while len(window.entries) > self.rule.length:
            window.entries.popleft()
        length, step = int(self.rule.length), int(self.rule.step)
        if window.seen >= length and (window.seen - length) % step == 0:
            alert = self._evaluate(group, window, list(window.entries))
            return [alert] if alert else []
        return []

    def advance(self, now: float) -> list[dict]:
        """Close the time windows of every group that end at or before ``now`` (event time)."""
        if now < self.earliest:
            return []
        alerts = []
        for group in sorted(self.groups):
            window = self.groups[group]
            while window.boundary is not None and window.boundary <= now:
                end = window.boundary
                start = end - self.rule.length
                while window.entries and window.entries[0][1] < start:
                    window.entries.popleft()
                alert = self._evaluate(group, window, [e for e in window.entries if e[1] < end], (start, end))
                if alert:
                    alerts.append(alert)
                window.boundary = end + self.rule.step
                if not window.entries:  # every later window up to `now` is empty too: skip them
                    window.streak = 0
                    window.boundary = max(window.boundary, (math.floor(now / self.rule.step) + 1) * self.rule.step)
        self.earliest = min((w.boundary for w in self.groups.values() if w.boundary is not None), default=math.inf)
        return alerts

    # -- evaluation ----------------------------------------------------------------------------------------
    def _evaluate(self, group: str, window: Window, inside: list[Entry],
                  bounds: tuple[float, float] | None = None) -> dict | None:
        counts = Counter(e[2] for e in inside)
        total = len(inside)
        hits = counts.get(self.rule.label, 0)
        if not total:  # an empty window is no evidence either way: it breaks a streak and never fires
            window.streak = 0
            return None
        value = hits if self.rule.measure == "count" else hits / total
        if not self.rule.holds(value):
            window.streak = 0
            return None
        window.streak += 1
        if window.streak != self.rule.repeat:  # fire once per crossing: on the K-th window in a row only
            return None
        return self._alert(group, inside, counts, value, bounds)

    def _alert(self, group: str, inside: list[Entry], counts: Counter, value: float,
               bounds: tuple[float, float] | None) -> dict:
        rule, total = self.rule, len(inside)
        lines = [e[0] for e in inside]
        times = [e[1] for e in inside]
        if bounds is None:
            window = {"kind": "records", "length": int(rule.length), "first_line": lines[0], "last_line": lines[-1]}
            end = f"line{lines[-1]}"
        else:
            window = {"kind": "time", "length_seconds": rule.length, "start": iso(bounds[0]), "end": iso(bounds[1]),
                      "first_line": lines[0] if lines else None, "last_line": lines[-1] if lines else None}
            end = iso(bounds[1])
        window.update({"first_time": iso(min(times)) if times else None, "last_time": iso(max(times)) if times else None,
                       "windows_in_a_row": rule.repeat})
        best = sorted(inside, key=lambda e: (-e[3], e[0]))[: self.top]
        return {
            "id": f"rule{self.index}/{group}/{end}",
            "rule": rule.text, "group": group, "window": window,
            "value": round(value, 6), "compare": rule.compare, "threshold": rule.threshold,
            "records": total, "counts": dict(sorted(counts.items())),
            "shares": {k: round(v / total, 6) for k, v in sorted(counts.items())} if total else {},
            "examples": [{"line": e[0], "time": iso(e[1]), "label": e[2], "score": e[3], "text": e[4],
                          **({"source": e[5]} if e[5] is not None else {})} for e in best],
        }

    # -- persistence ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"rule": self.rule.text, "groups": {g: w.to_dict() for g, w in self.groups.items()}}

    def load(self, data: dict) -> None:
        self.groups = {g: Window.from_dict(w) for g, w in data["groups"].items()}
        self.earliest = min((w.boundary for w in self.groups.values() if w.boundary is not None), default=math.inf)
