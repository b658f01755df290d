"""Dynamic batching: requests that arrive together (for any adapters) share one forward pass.

A worker thread takes the first waiting request, then keeps collecting for up to ``max_wait_ms`` or until
``max_batch_size`` rows are gathered, runs them as one mixed-adapter batch and hands every request its rows.
A row that fails comes back as its exception, so one bad request never fails the others in its batch.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass
class Pending:
    rows: list[tuple[str, str, str | None]]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Batcher:
    def __init__(self, run: Callable[[Sequence], list], max_batch_size: int = 32, max_wait_ms: float = 5.0) -> None:
        """``run(rows)`` returns one result per row: a value, or the Exception that row met."""
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue: queue.Queue[Pending | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="peftkit-batcher", daemon=True)
        self.thread.start()

    async def submit(self, rows: list[tuple[str, str, str | None]]) -> list:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.put(Pending(rows, future, loop))
        return await future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)

    def _work(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            size = len(first.rows)
            deadline = time.perf_counter() + self.max_wait
            while size < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = self.queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)
                    break
                batch.append(item)
                size += len(item.rows)
            self._run(batch)

    def _run(self, batch: list[Pending]) -> None:
        rows = [row for pending in batch for row in pending.rows]
        results: list = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            try:
                results += self.run(chunk)
            except Exception as err:  # run() isolates failing rows itself; this is the last line of defence
                results += [err] * len(chunk)
        offset = 0
        for pending in batch:  # each request gets its own rows' results (an Exception for a failed row)
            part = results[offset:offset + len(pending.rows)]
            offset += len(pending.rows)
            try:
                pending.loop.call_soon_threadsafe(_succeed, pending.future, part)
            except RuntimeError:  # the event loop closed (shutdown): nobody waits for this answer
                pass


def _succeed(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)
