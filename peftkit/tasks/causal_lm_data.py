"""Instruction data for ``task: causal-lm``: conversations read from files, rendered by the tokenizer's chat template,
with the loss on the assistant tokens only.

Formats (per JSONL line, the first that fits; CSV/TSV files use the prompt/completion columns):

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` (OpenAI chat format,
  multi-turn); a training conversation ends with an assistant turn;
- ``{"<prompt_column>": "...", "<completion_column>": "..."}`` (default ``prompt`` / ``completion``);
- ``{"instruction": "...", "input": "...", "output": "..."}`` (Alpaca; ``input`` may be empty or absent).

Every problem is a ``DataError`` naming the file and line. The label mask: a token is trained on when it starts
inside an assistant turn's span, from the end of the generation prompt before the turn to the end of the turn as
the template renders it (its end token included, trailing whitespace not), so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import data as D
from .data import DataError

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of a token outside the loss


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]  # {"role", "content"}; labelled ones end with an assistant turn
    line: int

    @property
    def prompt(self) -> tuple[dict, ...]:
        """The turns before the last assistant turn (what generation starts from)."""
        return self.messages[:-1] if self.messages and self.messages[-1]["role"] == "assistant" else self.messages

    @property
    def reference(self) -> str | None:
        """The last assistant turn's text (None when the conversation ends with the user)."""
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else None


@dataclass(frozen=True)
class Columns:
    prompt: str = "prompt"
    completion: str = "completion"
    system: str | None = None  # a system prompt put before prompt/completion and Alpaca examples


def read_conversations(path: str | Path, columns: Columns, labelled: bool = True) -> list[Conversation]:
    """Conversations of a .jsonl, .csv or .tsv file; with ``labelled`` each must end with an assistant answer."""
    path = Path(path)
    rows = D.table_rows(path)
    out = [Conversation(tuple(_messages(f"{path}, line {line}", row, columns, labelled)), line) for line, row in rows]
    if not out:
        raise DataError(f"{path}: no data rows (only a header?)")
    return out


def _messages(where: str, row: dict, columns: Columns, labelled: bool) -> list[dict]:
    if "messages" in row:
        return _chat(where, row["messages"], labelled)
    system = [{"role": "system", "content": columns.system}] if columns.system else []
    if columns.prompt in row:
        prompt = _text(where, row, columns.prompt)
        answer = [{"role": "assistant", "content": _text(where, row, columns.completion)}] if labelled else []
        return system + [{"role": "user", "content": prompt}] + answer
    if "instruction" in row:
        prompt = _text(where, row, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}, field 'input': expected a string, got {type(extra).__name__}")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra.strip()}"
        answer = [{"role": "assistant", "content": _text(where, row, "output")}] if labelled else []
        return system + [{"role": "user", "content": prompt}] + answer
    raise DataError(f"{where}: no 'messages', no {columns.prompt!r}/{columns.completion!r} and no Alpaca "
                    f"'instruction'/'output' (fields: {', '.join(sorted(row))}); set prompt_column and "
                    "completion_column to the file's column names")


def _text(where: str, row: dict, key: str) -> str:
    if key not in row:
        raise DataError(f"{where}: no field {key!r} (fields: {', '.join(sorted(row))})")
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}, field {key!r}: the text is empty")
    return value.strip()


def _chat(where: str, messages, labelled: bool) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, message in enumerate(messages):
        at = f"{where}, message {i + 1}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{at}: each message needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            kind = "assistant turn" if role == "assistant" else f"{role} message"
            raise DataError(f"{at}: empty {kind}")
        if role == "system" and i > 0:
            raise DataError(f"{at}: a system message may only come first")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise DataError(f"{where}: no user message")
    if labelled and out[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn (the answer to learn)")
    if not labelled and out[-1]["role"] == "assistant":
        out = out[:-1]  # generation starts after the user's last turn
    return out


# ---------------------------------------------------------------------------------------------- encoding
def check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the model's tokenizer has no chat template, which task causal-lm uses to build the "
                        "sequences; use an instruct model (e.g. model: smollm2) or set tokenizer.chat_template in "
                        "the model folder's tokenizer_config.json")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("task causal-lm needs a fast tokenizer (tokenizer.json) to find the assistant tokens")


def render(tokenizer, messages: Sequence[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn in it."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        through = render(tokenizer, messages[:i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError("the chat template does not render a conversation as a growing prefix (the turns "
                            "before an answer change when the answer is added), so the assistant tokens cannot "
                            "be found; use a template without that behaviour")
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def encode_conversation(tokenizer, messages: Sequence[dict], max_length: int) -> dict:
    """input_ids, attention_mask and labels (IGNORE outside assistant spans), cut to ``max_length``; ``cut``
    counts the tokens dropped and ``cut_labels`` the assistant tokens among them."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [token if any(s <= start < e for s, e in spans) and end > start else IGNORE
              for token, (start, end) in zip(ids, encoded["offset_mapping"])]
    cut = max(0, len(ids) - max_length)
    cut_labels = sum(label != IGNORE for label in labels[max_length:])
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "cut": cut, "cut_labels": cut_labels}


def encode_prompt(tokenizer, messages: Sequence[dict], max_length: int) -> list[int]:
    """Token ids of a prompt with the generation prompt, its start cut when longer than ``max_length``."""
    ids = tokenizer(render(tokenizer, messages, generation_prompt=True), add_special_tokens=False)["input_ids"]
    return list(ids[-max_length:])


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos and the first token the template puts after an
    answer (``<|im_end|>`` for ChatML)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "PROBE"}]
    try:
        text = render(tokenizer, probe)
    except Exception:  # a template that cannot render the probe: the eos alone
        return ids
    after = text[text.rfind("PROBE") + len("PROBE"):].lstrip()
    if after:
        first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        ids += [t for t in first if t not in ids]
    return ids


def collate(tokenizer, features: Sequence[dict]):
    """Right-padded batch: input_ids (pad id), attention_mask, labels (IGNORE on padding)."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def padded(key: str, value: int) -> "torch.Tensor":
        return torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features], dtype=torch.long)

    return {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", IGNORE)}
