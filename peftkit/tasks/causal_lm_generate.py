"""Generation for ``task: causal-lm``: batched greedy or sampled decoding (transformers' ``generate``) that stops
at the chat template's end of turn or at stop strings, and the end-of-training evaluation on a sample of dev
prompts: exact match, ROUGE-L (``rouge-score``) and BLEU (``sacrebleu``), base model vs adapted model."""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import causal_lm_data as C


@dataclass(frozen=True)
class Sampling:
    """How to decode: greedy when ``temperature`` is 0."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise C.DataError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise C.DataError(f"temperature must be 0 (greedy) or more (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise C.DataError(f"top_p must be in (0, 1] (got {self.top_p})")


def decoder(model: nn.Module) -> nn.Module:
    """The transformers model that ``generate`` runs on (adapter layers sit inside it, in place)."""
    from ..model import AdaptedModel

    return model.base_model if isinstance(model, AdaptedModel) else model


def generate(model: nn.Module, tokenizer, prompts: Sequence[Sequence[dict]], sampling: Sampling, max_length: int,
             batch_size: int = 8, streamer=None) -> list[dict]:
    """The answer to each prompt (a list of chat messages): ``{"text", "tokens", "finish_reason"}``, in order.

    Prompts are batched by length with left padding; a prompt longer than ``max_length`` keeps its end."""
    C.check_template(tokenizer)
    ends = C.end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    encoded = [C.encode_prompt(tokenizer, p, max_length) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[dict] = [{}] * len(encoded)
    net = decoder(model)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    options = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=ends, pad_token_id=pad,
                   do_sample=sampling.temperature > 0)
    if sampling.temperature > 0:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    if sampling.stop:
        options.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
    was_training = net.training
    net.eval()
    try:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in index)
            ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in index])
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in index])
            with torch.no_grad():
                out = net.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **options)
            for row, i in enumerate(index):
                results[i] = _answer(tokenizer, out[row, width:].tolist(), ends, pad, sampling)
    finally:
        net.train(was_training)
    return results


def _answer(tokenizer, tokens: list[int], ends: list[int], pad: int, sampling: Sampling) -> dict:
    finish = "length"
    for n, token in enumerate(tokens):
        if token in ends:
            tokens, finish = tokens[:n], "stop"
            break
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for stop in sampling.stop:  # transformers stops after the stop string; it is not part of the answer
        if stop in text:
            text, finish = text[:text.index(stop)], "stop"
    return {"text": text.strip(), "tokens": tokens, "finish_reason": finish}


# ------------------------------------------------------------------------------------------ metrics
def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """exact_match (share of answers equal to the reference after stripping), rougeL (mean F-measure, 0-1, by
    rouge-score) and bleu (sacrebleu's corpus BLEU, 0-100)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    n = max(1, len(references))
    return {"exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n,
            "rougeL": sum(rouge) / n,
            "bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}


@contextlib.contextmanager
def base_of(model: nn.Module, config):
    """The base model: the adapted model with its adapters off, or (a method training the whole model) a fresh
    copy of the base."""
    from ..model import AdaptedModel

    if isinstance(model, AdaptedModel):
        with model.disable_adapters():
            yield model
        return
    from transformers import AutoModelForCausalLM

    from .models import named_model

    path = named_model(config.model) or config.model
    yield AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def evaluate_generation(model: nn.Module, tokenizer, dev: Sequence[C.Conversation], config,
                        say: Callable[[str], None], shown: int = 3) -> dict:
    """Greedy answers to a seeded sample of ``config.eval_generations`` dev prompts, by the base and the adapted
    model, scored against the references; a few examples printed."""
    sample = list(dev)
    random.Random(config.seed).shuffle(sample)
    sample = sample[:config.eval_generations]
    prompts = [c.prompt for c in sample]
    references = [c.reference or "" for c in sample]
    sampling = Sampling(max_new_tokens=config.max_new_tokens)
    adapted = [a["text"] for a in generate(model, tokenizer, prompts, sampling, config.max_length, config.eval_batch_size)]
    with base_of(model, config) as base:
        before = [a["text"] for a in generate(base, tokenizer, prompts, sampling, config.max_length, config.eval_batch_size)]
    result = {"samples": len(sample), "max_new_tokens": config.max_new_tokens,
              "base": generation_metrics(before, references), "adapted": generation_metrics(adapted, references),
              "examples": [{"prompt": c.prompt[-1]["content"], "reference": r, "base": b, "adapted": a}
                           for c, r, b, a in list(zip(sample, references, before, adapted))[:shown]]}
    lines = [f"\ngeneration on {len(sample)} dev prompts (greedy, up to {config.max_new_tokens} new tokens):"]
    for name in ("exact_match", "rougeL", "bleu"):
        lines.append(f"  {name:>11}: base {result['base'][name]:.4f}   adapted {result['adapted'][name]:.4f}")
    for example in result["examples"]:
        lines.append(f"\n  prompt:    {_short(example['prompt'])}\n  reference: {_short(example['reference'])}"
                     f"\n  base:      {_short(example['base'])}\n  adapted:   {_short(example['adapted'])}")
    say("\n".join(lines))
    return result


def _short(text: str, width: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def write_generations(path: Path, rows: list[dict]) -> None:
    """Rows as JSON lines (``.jsonl``) or CSV, atomically."""
    import csv

    from ..atomic import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            if path.suffix.lower() == ".csv":
                writer = csv.DictWriter(handle, fieldnames=["prompt", "completion", "finish_reason"],
                                        extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
                return
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(Path(path), write)
