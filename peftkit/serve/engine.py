"""Batched multi-adapter decoding for causal LMs, with a KV cache and continuous batching.

One worker thread owns one running batch. Every iteration is either
  * a prefill: requests that arrived since the last step (for any adapters) are left-padded into one batch, run
    through the model once (each row through its own adapter: ``AdaptedModel.mixed_batch``), and their KV cache
    rows are merged into the running batch's cache (both caches are left-padded to a common length and
    concatenated along the batch; the attention mask hides the padding and position ids count only real tokens),
  * or a decode step: the last token of every row, one forward over the whole cache.
Rows that finish (end token, stop string, ``max_tokens``, the context, a cancelled request) leave the cache at
once; leading columns that only padding uses are cut off, so a long-finished row costs nothing.

A request whose adapter cannot share a batch with the running ones (``mixed_refusal``, e.g. DoRA) waits until
the batch drains, and nothing behind it is admitted first (first come, first served).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..mixing import BASE

log = logging.getLogger("peftkit.serve")


@dataclass
class Sampling:
    """How one request generates. ``temperature`` 0: greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()


@dataclass(eq=False)  # rows are compared by identity
class Row:
    """One request in the engine. ``sink(event)`` is called from the worker thread with
    ("delta", text), then once ("done", finish_reason) or ("error", message, http_status)."""

    adapter: str
    prompt: list[int]
    sampling: Sampling
    sink: Callable[[tuple], None]
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the generated text, cut at a stop string once one is found
    sent: int = 0  # characters of ``text`` already handed to the sink
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    submitted: float = field(default_factory=time.perf_counter)  # (for time to first token)
    last_token: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    def __init__(self, model, tokenizer, lock: threading.RLock | None = None, max_batch_size: int = 16,
                 context_length: int | None = None, eos_ids: Sequence[int] | None = None) -> None:
        """``model``: an ``AdaptedModel`` over a causal LM in eval mode. ``lock`` is held around every forward (the
        server's adapter loading takes it too)."""
        self.model = model
        self.tokenizer = tokenizer
        self.lock = lock or threading.RLock()
        self.max_batch_size = max_batch_size
        self.context_length = min(context_length or model_context(model), model_context(model))
        self.eos_ids = set(eos_ids) if eos_ids is not None else end_tokens(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        #: called after every forward with the adapter of each row and whether it was a prefill (metrics, tests)
        self.on_step: Callable[[list[str], bool], None] | None = None
        #: the server's metrics (``openai_metrics.GenerationMetrics``): every forward and every new token
        self.observer = None
        self.waiting: collections.deque[Row] = collections.deque()
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (rows, cache length): 1 where a row has a real token
        self.wakeup = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._work, name="peftkit-decoder", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------ interface
    def submit(self, row: Row) -> Row:
        if row.sampling.seed is not None:
            row.generator = torch.Generator().manual_seed(row.sampling.seed)
        with self.wakeup:
            self.waiting.append(row)
            self.wakeup.notify()
        return row

    def generate(self, adapter: str, prompt: list[int], sampling: Sampling) -> Row:
        """Blocking: submit a row and wait until it finishes (for tests and scripts)."""
        done = threading.Event()
        row = Row(adapter, list(prompt), sampling, lambda event: done.set() if event[0] != "delta" else None)
        self.submit(row)
        done.wait()
        return row

    @property
    def active(self) -> int:
        """Rows decoding or waiting."""
        return len(self.rows) + len(self.waiting)

    def close(self) -> None:
        with self.wakeup:
            self.closed = True
            self.wakeup.notify()
        self.thread.join(timeout=5)

    # ----------------------------------------------------------------------------------------- the loop
    def _work(self) -> None:
        while True:
            with self.wakeup:
                while not self.closed and not self.rows and not self.waiting:
                    self.wakeup.wait()
                if self.closed:
                    return
                newcomers = self._admit()
            try:
                with self.lock, torch.inference_mode():
                    self._drop_unloaded()
                    if newcomers:
                        self._prefill(newcomers)
                    elif self.rows:
                        self._decode()
            except Exception as err:  # a failed forward fails the rows in it, never the worker
                log.exception("generation step failed")
                for row in newcomers or self.rows:
                    row.finish_reason = "error"
                    row.sink(("error", f"generation failed ({type(err).__name__}); the server log has the details", 500))
                self._keep([r for r in self.rows if r.finish_reason is None])

    def _admit(self) -> list[Row]:
        """Waiting rows that may join now: first come first served, up to the batch size, while their adapters
        can share one batch with the running rows."""
        admitted: list[Row] = []
        names = [row.adapter for row in self.rows]
        while self.waiting and len(self.rows) + len(admitted) < self.max_batch_size:
            row = self.waiting[0]
            if row.cancelled:
                self.waiting.popleft()
                continue
            if row.adapter != BASE and row.adapter not in self.model.adapters:
                self.waiting.popleft()
                row.sink(("error", f"the model {row.adapter!r} was unloaded", 404))
                continue
            if names and not self._mixable(names + [row.adapter]):
                break  # it waits for the batch to drain; nothing overtakes it
            admitted.append(self.waiting.popleft())
            names.append(row.adapter)
        return admitted

    def _mixable(self, names: list[str]) -> bool:
        try:
            with self.model.mixed_batch(names):
                return True
        except NotImplementedError:
            return False

    def _drop_unloaded(self) -> None:
        for row in self.rows:
            if row.adapter != BASE and row.adapter not in self.model.adapters:
                row.finish_reason = "error"
                row.sink(("error", f"the model {row.adapter!r} was unloaded while it generated", 404))
        self._keep([r for r in self.rows if r.finish_reason is None and not r.cancelled])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, names: list[str],
                 prefill: bool) -> tuple[torch.Tensor, object]:
        from transformers import DynamicCache

        cache = self.cache if not prefill else DynamicCache()
        device = next(self.model.parameters()).device
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                         cache=cache, use_cache=True, logits_to_keep=1, adapter_names=names)
        if self.observer is not None:
            self.observer.step(names, prefill, len(self.waiting))
        if self.on_step is not None:
            self.on_step(names, prefill)
        return out.logits[:, -1].float().cpu(), cache  # (the cache is filled in place)

    def _prefill(self, newcomers: list[Row]) -> None:
        width = max(len(row.prompt) for row in newcomers)
        ids = torch.full((len(newcomers), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(newcomers), width), dtype=torch.long)
        for i, row in enumerate(newcomers):
            ids[i, width - len(row.prompt):] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, [row.adapter for row in newcomers], prefill=True)
        self._merge(newcomers, cache, mask)
        self._advance(newcomers, logits)

    def _decode(self) -> None:
        ids = torch.tensor([[row.tokens[-1]] for row in self.rows])
        positions = self.mask.sum(1, keepdim=True)
        mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], dim=1)
        logits, self.cache = self._forward(ids, mask, positions, [row.adapter for row in self.rows], prefill=False)
        self.mask = mask
        self._advance(list(self.rows), logits)

    # ------------------------------------------------------------------------------------ tokens, text
    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Each row takes its next token from its logits (the last ``len(rows)`` rows of the batch); rows that
        finish leave the batch."""
        for row, row_logits in zip(rows, logits[len(logits) - len(rows):]):
            if row.cancelled:
                continue
            token = pick(row_logits, row.sampling, row.generator)
            row.tokens.append(token)
            now = time.perf_counter()
            if self.observer is not None:
                self.observer.token(row.adapter, now - (row.last_token or row.submitted), first=row.last_token is None)
            row.last_token = now
            self._emit(row, token)
        self._keep([r for r in self.rows if r.finish_reason is None and not r.cancelled])

    def _emit(self, row: Row, token: int) -> None:
        stops = row.sampling.stop
        if token in self.eos_ids:
            row.finish_reason = "stop"
        else:
            text = self.tokenizer.decode([t for t in row.tokens if t not in self.eos_ids], skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
            if hits:
                text, row.finish_reason = text[:min(hits)], "stop"
            row.text = text
            if row.finish_reason is None and (len(row.tokens) >= row.sampling.max_tokens
                                              or len(row.prompt) + len(row.tokens) >= self.context_length):
                row.finish_reason = "length"
        end = len(row.text)
        if row.finish_reason is None:  # hold back what a stop string could still claim, and half a character
            end -= max((len(s) - 1 for s in stops), default=0)
            while end > row.sent and row.text[end - 1] == "\ufffd":
                end -= 1
        if end > row.sent:
            row.sink(("delta", row.text[row.sent:end]))
            row.sent = end
        if row.finish_reason is not None:
            row.sink(("done", row.finish_reason))

    # ------------------------------------------------------------------------------------------- the cache
    def _merge(self, newcomers: list[Row], cache, mask: torch.Tensor) -> None:
        """Add the newcomers' cache rows under the running rows' (left-padded to a common length)."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(newcomers), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)])
            old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self.rows += newcomers

    def _keep(self, rows: list[Row]) -> None:
        """Shrink the batch to ``rows`` (a subsequence of the running rows) and cut the columns no row uses."""
        if len(rows) == len(self.rows):
            return
        if not rows:
            self.rows, self.cache, self.mask = [], None, None
            return
        kept = {id(row) for row in rows}
        keep = torch.tensor([i for i, row in enumerate(self.rows) if id(row) in kept])
        self.mask = self.mask[keep]
        start = int((self.mask.sum(0) > 0).long().argmax())  # first column some row still uses
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[keep.to(layer.keys.device), :, start:]
            layer.values = layer.values[keep.to(layer.values.device), :, start:]
        self.rows = [self.rows[i] for i in keep.tolist()]


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token: greedy at temperature 0, else sampled from the top-p share of the tempered distribution."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= sampling.top_p] = 0  # (the most likely token always stays)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def model_context(model) -> int:
    config = model.base_model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 2048


def end_tokens(model, tokenizer) -> set[int]:
    """The tokens that end a generation: the tokenizer's end token and the model's generation config's."""
    ids: set[int] = set()
    generation = getattr(model.base_model, "generation_config", None)
    for value in (getattr(generation, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids
