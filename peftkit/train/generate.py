"""``peftkit generate`` and ``peftkit chat``: answers of a causal-lm run folder (or a folder written by
``peftkit merge``), greedy or sampled, stopping at the chat template's end of turn or at stop strings."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from ..tasks.causal_lm_generate import Sampling, generate
from ..tasks.data import DataError
from .run import Run


def open_causal(path: str) -> Run:
    run = Run(path)
    if run.task.name != "causal-lm":
        raise DataError(f"{path}: a {run.task.name} run; peftkit generate/chat need a run of task causal-lm")
    return run


def prompt_messages(run: Run, text: str) -> list[dict]:
    system = run.config.system_prompt
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def generate_rows(run: Run, prompts: list[list[dict]], sampling: Sampling) -> list[dict]:
    answers = generate(run.model, run.tokenizer, prompts, sampling, run.config.max_length)
    return [{"prompt": p[-1]["content"], "completion": a["text"], "finish_reason": a["finish_reason"]}
            for p, a in zip(prompts, answers)]


def prompts_of_file(run: Run, path: str) -> list[list[dict]]:
    """The prompts of a data file (its answers, if any, are dropped: generation starts after the last user turn)."""
    return [list(c.prompt) for c in run.read_file(path, labelled=False)]


class _Printer:
    """A transformers streamer that prints the answer's text as it is decoded (the prompt skipped)."""

    def __init__(self, tokenizer, out: TextIO, sampling: Sampling) -> None:
        from transformers import TextStreamer

        stops = sampling.stop

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                self.shown = getattr(self, "shown", "") + text
                for stop in stops:  # hold back what a stop string cuts off
                    if stop in self.shown:
                        return
                out.write(text)
                out.flush()

        self.streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def chat(run: Run, sampling: Sampling, source: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Read user turns line by line, stream each answer; ``/reset`` starts over, ``/exit`` or end of input ends."""
    system = run.config.system_prompt
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    interactive = source.isatty()
    out.write("peftkit chat: type a message (/reset starts over, /exit or Ctrl-D ends)\n")
    turns = 0
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = source.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = history[:1] if system else []
            out.write("(conversation reset)\n")
            continue
        history.append({"role": "user", "content": text})
        printer = _Printer(run.tokenizer, out, sampling)
        answer = generate(run.model, run.tokenizer, [history], sampling, run.config.max_length,
                          streamer=printer.streamer)[0]
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": answer["text"]})
        turns += 1
    return turns


def write_rows(path: Path, rows: list[dict]) -> None:
    from ..tasks.causal_lm_generate import write_generations

    write_generations(path, rows)
