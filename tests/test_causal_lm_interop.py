"""Causal LMs across libraries and tied embeddings: a PEFT LoRA adapter generates the same greedy tokens in peftkit
(library and server engine) as in PeftModel; an Embedding adapter on a tied ``embed_tokens`` leaves ``lm_head``
alone, merged or not, saved or not."""

from __future__ import annotations

import threading

import pytest
import torch

import peftkit
from peftkit.tasks.causal_lm_data import encode_prompt
from peftkit.tasks.causal_lm_generate import Sampling, generate

from causal_helpers import chat_rows, tiny_chat_model, write_jsonl
from conftest import randomize
from serve_openai_helpers import tiny_causal_lm, tiny_tokenizer

PROMPTS = ["hello world the cat", "sky sea tree leaf", "one two"]
NEW = 10


# ------------------------------------------------------------------------------- PEFT adapter -> peftkit
@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """A tiny LLaMA and a LoRA adapter made by PEFT on it (every linear layer, non-zero weights), saved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft_lm")
    base = tiny_causal_lm(root / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], task_type="CAUSAL_LM")
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    theirs.save_pretrained(root / "adapters" / "peft")
    return base, root / "adapters", theirs.eval()


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    """transformers' (or PeftModel's) own greedy ``generate``."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW, do_sample=False, pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt):].tolist()


def test_a_peft_lora_adapter_generates_the_same_greedy_tokens_in_peftkit(peft_adapter):
    from transformers import AutoModelForCausalLM

    base, adapters, theirs = peft_adapter
    tokenizer = tiny_tokenizer()
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    prompts = [encode_prompt(tokenizer, m, 128) for m in messages]  # the chat template's prompt, as generate builds it
    expected = [_hf_greedy(theirs, p) for p in prompts]
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    assert expected != [_hf_greedy(plain, p) for p in prompts]  # the adapter matters
    ours = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(base), adapters / "peft").eval()
    answers = generate(ours, tokenizer, messages, Sampling(max_new_tokens=NEW), 128)
    assert [a["tokens"] for a in answers] == expected


def test_a_peft_lora_adapter_generates_the_same_greedy_tokens_in_the_server_engine(peft_adapter):
    from peftkit.serve.engine import Engine, Row
    from peftkit.serve.engine import Sampling as Served
    from peftkit.serve.generation import ServedLM

    base, adapters, theirs = peft_adapter
    served = ServedLM(base, adapters)
    assert served.discover() == [] and list(served.adapters) == ["peft"]
    tokenizer = tiny_tokenizer()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    engine = Engine(served.model, served.tokenizer, served.lock)
    try:
        done = [threading.Event() for _ in prompts]
        with engine.wakeup:  # queued together, so they are one batch of different lengths (left padding)
            rows = [engine.submit(Row("peft", p, Served(max_tokens=NEW, temperature=0),
                                      lambda e, d=d: d.set() if e[0] != "delta" else None))
                    for p, d in zip(prompts, done)]
        assert all(d.wait(30) for d in done)
    finally:
        engine.close()
    assert [r.tokens for r in rows] == [_hf_greedy(theirs, p) for p in prompts]


# ------------------------------------------------------------------------------------- tied embeddings
def _tied(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tiny_chat_model(tmp_path / "tiny", tie=True)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return folder, model


def _greedy(model, tokenizer, prompts=("hello there", "cancel my order please", "one two three")) -> list[list[int]]:
    messages = [[{"role": "user", "content": p}] for p in prompts]
    return [a["tokens"] for a in generate(model, tokenizer, messages, Sampling(max_new_tokens=8), 128)]


def test_an_embedding_adapter_on_tied_embeddings_leaves_lm_head_alone_merged_saved_and_reloaded(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, model = _tied(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    original = model.lm_head.weight.detach().clone()
    base_tokens = _greedy(model, tokenizer)
    adapted = peftkit.adapt(model, peftkit.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens"])).eval()
    randomize(adapted, scale=1.0)
    ids = torch.tensor([tokenizer("hello there, how can I help")["input_ids"]])
    with torch.no_grad():
        out = adapted(input_ids=ids, output_hidden_states=True)
    # the output projection is still the base's: logits = last hidden state @ original weight
    torch.testing.assert_close(out.logits, out.hidden_states[-1] @ original.T, atol=1e-5, rtol=1e-5)
    assert torch.equal(adapted.base_model.lm_head.weight, original)
    unmerged = _greedy(adapted, tokenizer)
    assert unmerged != base_tokens  # the adapted input embedding changes the answers

    plain = adapted.merge_and_unload().eval()
    assert torch.equal(plain.lm_head.weight, original)
    assert not torch.equal(plain.model.embed_tokens.weight, original)
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight
    assert _greedy(plain, tokenizer) == unmerged
    plain.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert again.config.tie_word_embeddings is False
    assert torch.equal(again.lm_head.weight, original)
    assert _greedy(again, tokenizer) == unmerged


def test_training_an_embedding_adapter_on_tied_embeddings_keeps_lm_head_and_merges_through_the_cli(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit import cli
    from peftkit.train.run import Run

    folder, model = _tied(tmp_path)
    original = model.lm_head.weight.detach().clone()
    write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--model", str(folder), "--task", "causal-lm", "--train_file", "train.jsonl",
                     "--output_dir", "run", "--max_steps", "8", "--batch_size", "8", "--learning_rate", "5e-2",
                     "--lora.target_modules", "[embed_tokens, q_proj, v_proj]", "--eval_generations", "0",
                     "--quiet", "true", "--seed", "0"]) == 0
    run = Run(tmp_path / "run")
    assert torch.equal(run.model.base_model.lm_head.weight, original)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    unmerged = _greedy(run.model, tokenizer)
    assert cli.main(["merge", "--run", "run", "--out", "merged"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(merged.lm_head.weight, original)
    assert not torch.equal(merged.model.embed_tokens.weight, original)
    assert _greedy(merged, tokenizer) == unmerged
