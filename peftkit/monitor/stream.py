"""The monitor's input: JSON lines from a file (optionally tailed as it grows) or from standard input, read in
batches with the byte offset of the first line not yet taken, so that a restart resumes at the exact line."""

from __future__ import annotations

import json
import math
import os
import select
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


class MonitorError(ValueError):
    """Monitor input or options that cannot work (the CLI exits 2 with this message)."""


@dataclass
class Record:
    line: int
    text: str
    time: float  # epoch seconds: the record's own time, else when it was read
    group: str
    source: Any


class LineReader:
    """Complete lines (ending in a newline) from a file descriptor, with their line numbers.

    ``offset``/``line`` always describe the first byte/line not yet handed out. Without ``follow`` the end of the
    input ends the stream (a last line without a newline counts); with ``follow`` a file is tailed: a line is taken
    only once its newline has been written, so a writer caught mid-line is never read half."""

    def __init__(self, path: str, offset: int = 0, line: int = 0, follow: bool = False) -> None:
        self.path, self.follow = path, follow
        self.fd = sys.stdin.fileno() if path == "-" else os.open(path, os.O_RDONLY)
        self.is_file = path != "-" and os.path.isfile(path)
        self.offset, self.line, self.done, self.buffer = offset, line, False, b""
        if self.is_file:
            size = os.fstat(self.fd).st_size
            if size < offset:
                raise MonitorError(f"{path} has {size} bytes but the saved state has read {offset}: the file was "
                                   "truncated or replaced. Give the original file, or a new --state folder to start over")
            os.lseek(self.fd, offset, os.SEEK_SET)
        else:  # a pipe cannot seek: skip what an earlier run took (the producer replays the same stream)
            skipped = 0
            while skipped < offset:
                chunk = os.read(self.fd, min(1 << 16, offset - skipped))
                if not chunk:
                    raise MonitorError(f"standard input ended after {skipped} bytes, before the saved offset {offset}")
                skipped += len(chunk)

    def close(self) -> None:
        if self.path != "-":
            os.close(self.fd)

    @property
    def lag_bytes(self) -> int | None:
        return max(0, os.fstat(self.fd).st_size - self.offset) if self.is_file else None

    def batch(self, size: int) -> list[tuple[int, bytes]]:
        """Up to ``size`` lines: what is available now, waiting only when nothing is (an empty list: nothing new
        yet while following, or the end of the input, then ``done`` is set)."""
        out: list[tuple[int, bytes]] = []
        while len(out) < size and not self.done:
            newline = self.buffer.find(b"\n")
            if newline >= 0:
                self._take(out, newline + 1)
                continue
            if out and not self._ready():
                break
            chunk = os.read(self.fd, 1 << 16)
            if chunk:
                self.buffer += chunk
                continue
            if self.follow and self.is_file:
                if os.fstat(self.fd).st_size < self.offset + len(self.buffer):
                    raise MonitorError(f"{self.path} shrank below the {self.offset} bytes already read (truncated or "
                                       "rotated); restart the monitor on the new file with a new --state folder")
                break  # nothing more yet: the caller waits and asks again
            if self.buffer:  # the input ended without a final newline
                self._take(out, len(self.buffer))
            self.done = True
        return out

    def _take(self, out: list, length: int) -> None:
        raw, self.buffer = self.buffer[:length], self.buffer[length:]
        self.offset += length
        self.line += 1
        out.append((self.line, raw))

    def _ready(self) -> bool:
        if self.is_file:
            return True
        return bool(select.select([self.fd], [], [], 0)[0])


def parse_time(value: Any) -> float:
    """Epoch seconds from a number or an ISO 8601 string (without a zone: UTC)."""
    if isinstance(value, bool):
        raise ValueError("a time must be epoch seconds or an ISO 8601 string, not true/false")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError("the time is not a finite number")
        return float(value)
    if isinstance(value, str):
        stamp = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
        return stamp.timestamp()
    raise ValueError(f"a time must be epoch seconds or an ISO 8601 string, not {type(value).__name__}")


def parse_record(line: int, raw: bytes, group_by: str | None) -> Record | str | None:
    """A record, or the reason the line is malformed (a string), or None for an empty line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 ({err.reason} at byte {err.start})"
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not JSON ({err.msg} at column {err.colno})"
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object with a 'text' field"
    body = data.get("text")
    if not isinstance(body, str) or not body.strip():
        return "no 'text' field with a non-empty string"
    try:
        stamp = parse_time(data["time"]) if data.get("time") is not None else time.time()
    except ValueError as err:
        return f"bad 'time' {data['time']!r}: {err}"
    group = "*" if group_by is None else data.get(group_by)
    group = "(none)" if group is None else group if isinstance(group, str) else json.dumps(group)
    return Record(line, body, stamp, group, data.get("source"))
