"""A tiny LLaMA causal LM with a tiny word-level tokenizer and a chat template, saved as a model folder, and LoRA
adapter folders with non-zero weights on it (for the generation server's tests)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

import peftkit

from conftest import randomize

WORDS = ("hello world the a cat dog sat on mat is big small red blue green runs jumps quickly slowly and or not "
         "yes no one two three four five six seven eight nine ten what where who why how good bad happy sad sun "
         "moon star sky sea tree leaf rain snow wind fire stone road city house door").split()
SPECIALS = ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + ROLES + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)


def tiny_causal_lm(folder: Path, seed: int = 0, context: int = 256) -> Path:
    """A model folder (config, weights, tokenizer) of a 2-layer LLaMA over the tiny vocabulary. The end token's
    output row is zeroed, so that greedy text never ends by chance: tests choose when it ends."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0
        model.lm_head.weight.mul_(20)  # peaked logits: greedy tokens are far from ties
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, seed: int, config=None) -> Path:
    """A plain PEFT-format adapter folder with random non-zero weights on ``base``."""
    from transformers import AutoModelForCausalLM

    model = peftkit.adapt(AutoModelForCausalLM.from_pretrained(base),
                          config or peftkit.LoraConfig(r=4, target_modules="all-linear"))
    randomize(model, seed=seed, scale=0.5)
    model.save_adapter(folder)
    return folder


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free loopback port in this process; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    while not runner.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        runner.should_exit = True
        thread.join(10)
