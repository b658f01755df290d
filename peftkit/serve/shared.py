"""One encoder body for several tasks (``peftkit serve --task auto``): sequence-classification and token-classification
adapters on the same base share ONE forward of the body in a mixed batch, each row through its own adapter (the
per-row adapter path), then each row through its own head.

``SharedEncoder`` holds the body once (``body``) and one placeholder ``classifier``; every adapter keeps its own
head as a ``modules_to_save`` copy of it (sized to its labels or tags), which the mixed batch applies row by row.
A row's head reads the body's hidden states its own way (``kinds``): ``"token"`` every position (the token
classifier), ``"mean"``/``"cls"`` the pooled sentence vector (classification's pooled head, placed at position 0
so that one head call serves every row). A run folder's adapter file names the body as its own task model did
(``encoder.`` or ``bert.``): ``rename`` maps those keys onto ``body.`` when it is loaded.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch
from torch import nn

from ..tasks import Task
from ..tasks.heads import PooledForSequenceClassification

TOKEN = "token"


class SharedEncoder(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.classifier = nn.Linear(body.config.hidden_size, 2)  # placeholder: each adapter brings its own head
        self.kinds: Sequence[str] | None = None  # set per forward: how each row's head reads the hidden states

    @property
    def config(self):
        return self.body.config

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.body(**inputs).last_hidden_state
        kinds = list(self.kinds or [TOKEN] * hidden.shape[0])
        x = hidden.clone()
        for kind in set(kinds) - {TOKEN}:  # the pooled heads' input, computed as classification computes it
            rows = torch.tensor([i for i, k in enumerate(kinds) if k == kind])
            pooled = PooledForSequenceClassification.pool(SimpleNamespace(pooling=kind), hidden[rows],
                                                          None if attention_mask is None else attention_mask[rows])
            x[rows, 0] = pooled
        return self.classifier(x)  # [rows, positions, widest head]: a pooled row's logits are at position 0


def load_body(model_path: str) -> nn.Module:
    """The base encoder without a pooler (neither pooled classification nor token classification uses it)."""
    from transformers import AutoModel

    from ..tasks.heads import _has_pooler_arg

    if _has_pooler_arg(model_path):
        return AutoModel.from_pretrained(model_path, add_pooling_layer=False)
    return AutoModel.from_pretrained(model_path)


def body_prefix(task_model: nn.Module, body: nn.Module) -> str:
    """The name under which a task's own model keeps the encoder (``encoder``, ``bert``, ...)."""
    for name, child in task_model.named_children():
        if type(child) is type(body):
            return name
    raise ValueError(f"{type(task_model).__name__} has no {type(body).__name__} child to share")


def renamer(prefix: str):
    head = prefix + "."
    return lambda key: "body." + key[len(head):] if key.startswith(head) else key


def shared_batch(tokenizer, pad_id: int, parts: list[tuple[Task, list[dict], list[str], str]]) -> tuple[dict, list]:
    """One padded batch from several tasks' rows. ``parts``: (task, features, adapter names, head kind) per group;
    returns the batch (with ``adapter_names`` and ``kinds`` per row) and, per group, (task, its collated batch,
    first row, row count) for splitting the logits."""
    groups, rows, names, kinds = [], [], [], []
    for task, features, adapters, kind in parts:
        batch = task.collate(tokenizer, features)
        count = batch["input_ids"].shape[0]
        owner = batch.get("token_plan", {}).get("owner") if kind == TOKEN else None
        names += [adapters[s] for s in owner] if owner else list(adapters)[:count]
        kinds += [kind] * count
        groups.append((task, batch, len(rows), count))
        rows += [{k: batch[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
                 for i in range(count)]
    width = max(len(r["input_ids"]) for r in rows)
    joined = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if any(key in r for r in rows):
            joined[key] = torch.full((len(rows), width), fill, dtype=torch.long)
            for i, r in enumerate(rows):
                value = r.get(key, torch.zeros_like(r["input_ids"]) if key == "token_type_ids" else None)
                joined[key][i, :len(value)] = value
    return {"batch": joined, "adapter_names": names, "kinds": kinds}, groups
