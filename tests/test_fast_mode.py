"""Fast mode (``peftkit.fast_training``) at model level in train mode, and the CLI's ``fast`` and ``bf16`` runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import peftkit
import peftkit.fast as fast
from peftkit.cli import main
from peftkit.train.run import Run

from conftest import randomize, tiny_bert
from workflow_helpers import Probe, intent_rows, read_texts, tiny_model_dir, train_history, write_csv


def _spy_attention(monkeypatch) -> list[float]:
    """Record the dropout of every call that goes through peftkit's registered attention function."""
    from transformers import AttentionInterface

    fast._register_attention()
    registered = AttentionInterface._global_mapping[fast.ATTENTION_NAME]
    calls: list[float] = []

    def spy(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
        calls.append(dropout)
        return registered(module, query, key, value, attention_mask, dropout=dropout, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, fast.ATTENTION_NAME, spy)
    return calls


def _spy_kernel(monkeypatch) -> list[float]:
    """Record the calls of the fast-mask attention kernel (used when attention dropout is on)."""
    calls: list[float] = []
    kernel = fast.attention

    def spy(q, k, v, mask=None, dropout=0.0, *args, **kwargs):
        calls.append(dropout)
        return kernel(q, k, v, mask, dropout, *args, **kwargs)

    monkeypatch.setattr(fast, "attention", spy)
    return calls


def _base_dropouts(model: nn.Module) -> list[str]:
    """Type names of the dropouts the base model calls (a FastDropout keeps the original only to restore it)."""
    return [type(m).__name__ for name, m in model.base_model.bert.named_modules()
            if isinstance(m, (nn.Dropout, fast.FastDropout)) and not name.endswith(".original")]


def test_fast_mode_trains_like_eager_mode_without_dropout(monkeypatch):
    """Train mode, dropout 0 everywhere: the same loss and the same gradients as eager mode, while the forward
    really went through FastDropout modules and peftkit's attention function."""
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=4, dropout=0.0, target_modules="all-linear"))
    randomize(model, scale=0.1)
    reference = copy.deepcopy(model)
    assert reference.base_model.config._attn_implementation == "sdpa"
    peftkit.fast_training(model)
    assert model.base_model.config._attn_implementation == fast.ATTENTION_NAME
    assert set(_base_dropouts(model)) == {"FastDropout"}
    assert len(_base_dropouts(model)) == len(_base_dropouts(reference))
    calls = _spy_attention(monkeypatch)

    inputs = {"input_ids": torch.randint(0, 100, (3, 11)), "attention_mask": torch.ones(3, 11, dtype=torch.long),
              "labels": torch.tensor([0, 2, 1])}
    inputs["attention_mask"][2, 7:] = 0  # padding: the mask path of the attention function
    model.train(), reference.train()
    out, expected = model(**inputs), reference(**inputs)
    assert calls == [0.0, 0.0]  # both layers, through peftkit's function, in train mode
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=1e-6)
    out.loss.backward()
    expected.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == reference_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-5)


def test_fast_mode_with_dropout_uses_the_fast_kernels(monkeypatch):
    """With dropout on, training goes through the fast-mask attention kernel and FastDropout; eval stays exact."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = peftkit.adapt(BertForSequenceClassification(config), peftkit.LoraConfig(r=4, target_modules="all-linear"))
    reference = copy.deepcopy(model).eval()
    peftkit.fast_training(model)
    calls, kernel = _spy_attention(monkeypatch), _spy_kernel(monkeypatch)
    ids = torch.randint(0, 100, (2, 9))
    model.train()
    torch.manual_seed(5)
    first = model(input_ids=ids).logits
    torch.manual_seed(5)
    again = model(input_ids=ids).logits
    assert calls == [0.1, 0.1] * 2 and kernel == [0.1, 0.1] * 2
    torch.testing.assert_close(first, again, atol=0, rtol=0)  # the masks follow torch's seed
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
        torch.testing.assert_close(evaluated, reference(input_ids=ids).logits, atol=0, rtol=0)
    assert not torch.allclose(first, evaluated)  # dropout really acted in train mode
    assert kernel == [0.1, 0.1] * 2  # eval calls (dropout 0) use plain SDPA, not the kernel


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    return {"model": tiny_model_dir(root, dropout=0.1), "train": write_csv(root / "train.csv", intent_rows(48, seed=1)),
            "dev": write_csv(root / "dev.csv", intent_rows(12, seed=2))}


def _args(files, out, *extra):
    return ["train", "--model", str(files["model"]), "--train_file", str(files["train"]), "--dev_file",
            str(files["dev"]), "--output_dir", str(out), "--epochs", "6", "--batch_size", "8", "--quiet", "true",
            "--max_length", "16", "--pooling", "mean", "--learning_rate", "1e-2", "--lora.r", "4", *extra]


def _loss_falls(report: dict) -> None:
    losses = [h["train_loss"] for h in train_history(report)]
    assert len(losses) == 36  # 6 epochs of 6 steps
    first_epoch, last_epoch = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last_epoch < 0.85 * first_epoch, losses


def test_cli_fast_run_switches_the_model_and_reloads_what_was_trained(files, tmp_path, monkeypatch):
    probe = Probe(monkeypatch)
    calls, kernel = _spy_attention(monkeypatch), _spy_kernel(monkeypatch)
    out = tmp_path / "run"
    assert main(_args(files, out, "--fast", "true")) == 0
    report = json.loads((out / "report.json").read_text())
    _loss_falls(report)
    trained = probe.best[-1].model
    called = [type(m).__name__ for name, m in trained.base_model.encoder.named_modules()
              if isinstance(m, (nn.Dropout, fast.FastDropout)) and not name.endswith(".original")]
    assert called and set(called) == {"FastDropout"}
    assert trained.base_model.config._attn_implementation == fast.ATTENTION_NAME
    # every training forward (36 steps x 2 layers) went through the fast-mask attention kernel
    assert kernel.count(0.1) == 36 * 2 and calls.count(0.1) == 36 * 2
    torch.testing.assert_close(Run(out).probabilities(read_texts(files["dev"])), probe.best[-1].probabilities,
                               atol=1e-5, rtol=1e-4)


def test_cli_bf16_run_keeps_fp32_adapters_and_reloads_what_was_trained(files, tmp_path, monkeypatch):
    probe = Probe(monkeypatch)
    out = tmp_path / "run"
    assert main(_args(files, out, "--bf16", "true")) == 0
    report = json.loads((out / "report.json").read_text())
    _loss_falls(report)
    best = probe.best[-1]
    frozen = [p for p in best.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen if p.is_floating_point())
    assert all(v.dtype == torch.float32 for v in best.state.values())
    # the saved adapter in a bf16 base, evaluated as the trainer evaluates (autocast), is the in-memory model
    trainer = probe.trainer
    reloaded_model = Run(out).model  # loaded for inference: nothing requires grad
    reloaded = dict(reloaded_model.named_parameters())
    for name in best.state:
        reloaded[name].requires_grad_(True)  # trainable as in the run, so that cast_frozen keeps them fp32
    trainer.model = reloaded_model.cast_frozen(torch.bfloat16)
    logits, _ = trainer.predict("dev")
    torch.testing.assert_close(torch.softmax(logits, -1), best.probabilities, atol=1e-6, rtol=1e-5)
    for name, value in best.state.items():
        assert torch.equal(reloaded[name], value), name
    # in full precision (peftkit eval / predict) the same adapter gives the same predictions up to bf16 rounding
    fp32 = Run(out).probabilities(read_texts(files["dev"]))
    torch.testing.assert_close(fp32, best.probabilities, atol=3e-2, rtol=0)
