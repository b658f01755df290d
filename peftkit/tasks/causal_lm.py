"""Causal-LM instruction tuning (``task: causal-lm``): chat / prompt-completion / Alpaca data, loss on the assistant
tokens, dev loss and perplexity at each evaluation, generation metrics at the end.

The model is ``AutoModelForCausalLM`` (no new head: ``method: head`` is refused); the data and the label mask are
``causal_lm_data.py``; generation and its metrics (exact match, ROUGE-L, BLEU; base vs adapted) are
``causal_lm_generate.py``. A merged folder is a plain transformers causal-LM folder.

The per-example "logits" the trainer and ``peftkit eval`` see are two numbers per conversation: the summed negative
log-likelihood of its assistant tokens and their count. Training minimises the mean over examples of each example's
mean token loss; the reported dev ``loss`` is the mean over all assistant tokens, ``perplexity`` its exp.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import Datasets, Task, register_task
from . import causal_lm_data as C
from .causal_lm_loss import conversation_sums
from .data import DataError

CARRIED = ("method", "max_length", "prompt_column", "completion_column", "system_prompt", "max_new_tokens")


class CausalLM(Task):
    name = "causal-lm"
    vocabulary_file = "generation.json"
    column_keys = ("prompt_column", "completion_column")
    curve_metrics = ("perplexity",)
    best_metrics = ("loss",)

    # -- the model ---------------------------------------------------------------------------------------
    def build_model(self, model_path: str, config, vocabulary) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    # -- reading data ------------------------------------------------------------------------------------
    def _columns(self, config) -> C.Columns:
        return C.Columns(config.prompt_column, config.completion_column, config.system_prompt)

    def read(self, path: str | Path, config, labelled: bool = True) -> list[C.Conversation]:
        return C.read_conversations(path, self._columns(config), labelled=labelled)

    def load_datasets(self, config) -> Datasets:
        from ..config import ConfigError
        from ..methods import get_method

        if config.method == "head" or get_method(config.method).train_logits is not None:
            raise ConfigError(f"method: {config.method!r} trains a task head, and a causal LM gets no new head (its "
                              "lm_head is tied to the embeddings); use lora, dora, adalora, bottleneck, bitfit or full")
        if config.distill is not None:
            raise ConfigError("distill: is offered for classification; drop the distill settings for task causal-lm")
        train = self.read(config.train_file, config)
        if config.dev_file:
            dev = self.read(config.dev_file, config)
        else:
            order = list(range(len(train)))
            random.Random(config.seed).shuffle(order)
            take = max(1, int(round(len(train) * config.dev_split))) if len(train) > 1 else 0
            dev, train = [train[i] for i in sorted(order[:take])], [train[i] for i in sorted(order[take:])]
        test = self.read(config.test_file, config) if config.test_file else []
        return Datasets({"format": "chat"}, train, dev, test)

    def inputs(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[C.Conversation]:
        return [C.Conversation(({"role": "user", "content": t},), i + 1) for i, t in enumerate(texts)]

    def vocabulary_to_dict(self, vocabulary) -> dict:
        return dict(vocabulary)

    def vocabulary_from_dict(self, data: dict) -> dict:
        if not isinstance(data, dict):
            raise DataError("must hold a JSON object")
        return data

    def names(self, vocabulary) -> list[str]:
        return []

    def targets(self, examples: Sequence, vocabulary, source: str) -> list:
        return [None] * len(examples)  # the labels are the assistant tokens, made by encode

    # -- batches -------------------------------------------------------------------------------------------
    def encode(self, tokenizer, examples: Sequence[C.Conversation], max_length: int) -> list[dict]:
        if not examples:
            return []
        C.check_template(tokenizer)
        features = [C.encode_conversation(tokenizer, e.messages, max_length) for e in examples]
        cut = [f for f in features if f["cut"]]
        if cut:
            lost = sum(f["cut_labels"] for f in cut)
            empty = sum(1 for f in cut if all(label == C.IGNORE for label in f["labels"]))
            print(f"note: {len(cut)} of {len(features)} conversations are longer than max_length={max_length} tokens "
                  f"and were cut ({sum(f['cut'] for f in cut)} tokens, {lost} of them assistant tokens"
                  + (f"; {empty} keep no assistant token and add nothing to the loss" if empty else "")
                  + "); raise max_length to keep them whole", file=sys.stderr, flush=True)
        return features

    def collate(self, tokenizer, features: Sequence[dict]) -> dict:
        return C.collate(tokenizer, features)

    def forward(self, model: nn.Module, batch: dict, **kwargs) -> torch.Tensor:
        """Per conversation: [summed NLL of its assistant tokens, their count] (teacher-forced; only the labelled
        positions go through the output head, in chunks: ``causal_lm_loss``)."""
        return conversation_sums(model, batch, **kwargs)

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def loss_sum(self, logits: torch.Tensor, targets: Sequence) -> torch.Tensor:
        return (logits[:, 0] / logits[:, 1].clamp(min=1)).sum()

    # -- evaluation and report ---------------------------------------------------------------------------
    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def metrics(self, logits: torch.Tensor, targets: Sequence, vocabulary) -> dict:
        tokens = float(logits[:, 1].sum()) if len(logits) else 0.0
        loss = float(logits[:, 0].sum()) / tokens if tokens else float("nan")
        perplexity = math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("nan")
        return {"loss": loss, "perplexity": perplexity, "tokens": int(tokens),
                "report_text": f"{int(tokens)} assistant tokens scored"}

    def summary(self, result: dict) -> str:
        return f"loss {result['loss']:.4f} per assistant token   perplexity {result['perplexity']:.3f}"

    def final_evaluation(self, model: nn.Module, tokenizer, datasets: Datasets, config, say) -> dict:
        from .causal_lm_generate import evaluate_generation

        if not datasets.dev:
            return {}
        out = {"base_dev": self.base_dev(model, tokenizer, datasets.dev, config, say)}
        if config.eval_generations:
            out["generation"] = evaluate_generation(model, tokenizer, datasets.dev, config, say)
        return out

    def base_dev(self, model: nn.Module, tokenizer, dev: Sequence[C.Conversation], config, say) -> dict:
        """Dev loss and perplexity of the base model (adapters off), the "before" of the run's dev numbers."""
        from .causal_lm_generate import base_of

        # encode_conversation, not encode: the truncation note was printed once already
        features = sorted((C.encode_conversation(tokenizer, e.messages, config.max_length) for e in dev),
                          key=lambda f: len(f["input_ids"]))  # batches by length; the metrics are sums
        size = config.eval_batch_size
        with base_of(model, config) as base, torch.no_grad():
            base.eval()
            sums = [self.forward(base, self.collate(tokenizer, features[i:i + size])).float()
                    for i in range(0, len(features), size)]
        result = self.metrics(torch.cat(sums), [], None)
        say(f"base model on dev: {self.summary(result)}")
        return {key: result[key] for key in ("loss", "perplexity", "tokens")}

    def settings(self, config) -> dict:
        return {"max_length": config.max_length, **({"system_prompt": config.system_prompt}
                                                      if config.system_prompt else {})}

    def info(self, report: dict) -> dict:
        out = {}
        for split in ("dev", "test"):
            if split in report:
                out[f"{split} loss"] = round(report[split]["loss"], 4)
                out[f"{split} perplexity"] = round(report[split]["perplexity"], 3)
        if "base_dev" in report:
            out["base dev loss"] = round(report["base_dev"]["loss"], 4)
            out["base dev perplexity"] = round(report["base_dev"]["perplexity"], 3)
        generation = report.get("generation") or {}
        for key in ("rougeL", "bleu", "exact_match"):
            if key in generation.get("adapted", {}):
                out[f"{key} (base -> adapted)"] = f"{generation['base'][key]:.4f} -> {generation['adapted'][key]:.4f}"
        return out

    # -- prediction output -------------------------------------------------------------------------------
    def prediction_rows(self, examples: Sequence, outputs, vocabulary) -> list[dict]:
        raise DataError("task causal-lm generates text: use peftkit generate --run DIR (--prompt TEXT | --data FILE)")

    def write_predictions(self, path: Path, rows: list[dict], vocabulary) -> None:
        from .causal_lm_generate import write_generations

        write_generations(path, rows)

    # -- merged folders ------------------------------------------------------------------------------------
    def write_merged(self, folder: Path, plain: nn.Module, vocabulary, config, run_path: Path, tokenizer) -> dict:
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        marker = {"format": "AutoModelForCausalLM", "base_model": config.model, "merged_from": str(run_path),
                  **{key: getattr(config, key) for key in CARRIED}}
        (folder / "README.md").write_text(
            f"# Merged model: a transformers causal LM\n\nMerged from the peftkit run `{run_path}` (method "
            f"`{config.method}`, base model `{config.model}`): the trained weights, any adapter folded into them; "
            "nothing here needs peftkit.\n\n- `config.json` + `model.safetensors`: a standard "
            f"`{type(plain).__name__}` (`AutoModelForCausalLM.from_pretrained(this folder)`).\n- tokenizer files "
            "with the chat template the run trained with (`tokenizer.apply_chat_template(messages, "
            "add_generation_prompt=True)`).\n"
            f"- `peftkit_head.json`: the run's settings, read by `peftkit generate/chat/eval --run`.\n",
            encoding="utf-8")
        return marker

    def open_merged(self, folder: Path, marker: dict) -> tuple[dict, dict]:
        return {key: marker[key] for key in CARRIED if key in marker}, {"format": "chat"}

    def merged_model(self, folder: Path, config, vocabulary) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


register_task(CausalLM())
