"""End to end on the packaged all-MiniLM-L6-v2: a few LoRA steps lower the loss; the saved adapter reproduces logits."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.tasks.demo import minilm_path, read_intents

pytestmark = pytest.mark.slow


def test_lora_trains_saves_and_reloads_on_minilm(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    texts, labels = read_intents("train")
    names = sorted(set(labels))
    # two examples of each intent: a tiny batch the adapter can fit in a few steps
    picked = [i for name in names for i in [j for j, l in enumerate(labels) if l == name][:2]]
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer([texts[i] for i in picked], padding=True, return_tensors="pt")
    target = torch.tensor([names.index(labels[i]) for i in picked])

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))
    adapted = peftkit.adapt(model, peftkit.LoraConfig(r=8, alpha=16, target_modules=["query", "value"]))
    share = adapted.trainable_parameters().share
    assert 0 < share < 0.02
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=5e-3)
    adapted.train()
    losses = []
    for _ in range(10):
        loss = adapted(**batch, labels=target).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    lora_B = adapted.base_model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    assert lora_B.abs().sum() > 0  # the adapter really moved away from its zero init

    adapted.eval()
    with torch.no_grad():
        expected = adapted(**batch).logits
    adapted.save_adapter(tmp_path)
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))
    reloaded = peftkit.load_adapter(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
