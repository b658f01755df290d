"""A tiny chat model for the causal-lm tests, built here (never downloaded): a byte-level BPE tokenizer trained on a
few sentences, with ChatML special tokens and a ChatML chat template, and a 2-layer LLaMA sized to it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["hello there, how can I help you today?", "the order will arrive on monday", "cancel my order please",
          "what is the refund policy", "system user assistant", "yes no maybe", "one two three four five six"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", additional_special_tokens=SPECIAL[1:])
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_chat_model(folder: Path, seed: int = 0, tie: bool = True) -> Path:
    """A tiny LLaMA + tokenizer saved as a transformers folder (usable as ``model:``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int = 24) -> list[dict]:
    """Short conversations the tiny model can learn in a few steps (the answer is fixed per question)."""
    pairs = [("cancel my order please", "yes"), ("what is the refund policy", "no"), ("hello there", "maybe")]
    return [{"messages": [{"role": "user", "content": pairs[i % 3][0]},
                          {"role": "assistant", "content": pairs[i % 3][1]}]} for i in range(n)]
