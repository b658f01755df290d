"""The chunked causal-LM loss (only labelled positions through the head, gradients computed in the same pass) equals
the plain logits loss in value and in every gradient, and steps aside where it does not apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.ops import token_loss
from peftkit.ops.token_loss import head_token_nll
from peftkit.tasks import causal_lm_loss
from peftkit.tasks.causal_lm_loss import _plain_nll, conversation_sums

from conftest import tiny_gpt2, tiny_llama


def _batch(vocab: int = 100, rows: int = 3, length: int = 12) -> dict:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[1] = -100  # a row with nothing to score
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # left padding
    labels[2, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _adapted(build, dropout: float = 0.0):
    model = peftkit.adapt(build(), peftkit.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _sums_and_grads(model, batch, chunked: bool):
    for param in model.parameters():
        param.grad = None
    if chunked:
        sums = conversation_sums(model, batch)
    else:
        nll = _plain_nll(model, batch)
        labels = batch["labels"][:, 1:]
        sums = torch.stack([nll.sum(1), (labels != -100).sum(1).to(nll.dtype)], dim=1)
    (sums[:, 0] / sums[:, 1].clamp(min=1)).sum().backward()
    return sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-tied"])
@pytest.mark.parametrize("chunk", [None, 3 * 100])  # default; 3 positions per chunk (chunk edges inside rows)
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(build, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(token_loss, "CHUNK_ELEMENTS", chunk)
    model, batch = _adapted(build), _batch()
    model.train()
    split = causal_lm_loss._decoder_and_head(model)
    assert split is not None  # the chunked path is really the one tested
    plain, plain_grads = _sums_and_grads(model, batch, chunked=False)
    chunked, chunked_grads = _sums_and_grads(model, batch, chunked=True)
    assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-5)
    assert chunked[1].tolist() == [0.0, 0.0]  # nothing labelled: no loss, no count
    assert plain_grads.keys() == chunked_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_head_token_nll_matches_cross_entropy_and_input_gradient():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=generator, requires_grad=True)
    weight, bias = torch.randn(11, 8, generator=generator), torch.randn(11, generator=generator)
    targets = torch.randint(0, 11, (2, 5), generator=generator)
    targets[0, 1] = -100
    upstream = torch.rand(2, 5, generator=generator)
    ours = head_token_nll(hidden, weight, bias, targets)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), hidden)
    plain = nn.functional.cross_entropy((hidden @ weight.T + bias).transpose(1, 2), targets, reduction="none")
    (grad_plain,) = torch.autograd.grad((plain * upstream).sum(), hidden)
    assert torch.allclose(ours, plain, atol=1e-5) and ours[0, 1] == 0
    assert torch.allclose(grad_ours, grad_plain, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-tied"])
def test_full_fine_tuning_gets_every_gradient_including_the_head(build, monkeypatch):
    monkeypatch.setattr(token_loss, "CHUNK_ELEMENTS", 3 * 100)
    model, batch = build(), _batch()
    model.train()
    for param in model.parameters():
        param.requires_grad_(True)
    assert causal_lm_loss._decoder_and_head(model) is not None
    plain, plain_grads = _sums_and_grads(model, batch, chunked=False)
    chunked, chunked_grads = _sums_and_grads(model, batch, chunked=True)
    assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-5)
    head = "lm_head.weight" if build is tiny_llama else "transformer.wte.weight"  # GPT-2: tied to the embedding
    assert head in chunked_grads and chunked_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_a_trainable_head_with_bias_gets_its_gradients():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=generator, requires_grad=True)
    weight = torch.randn(11, 8, generator=generator, requires_grad=True)
    bias = torch.randn(11, generator=generator, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=generator)
    targets[1, 0] = -100
    upstream = torch.rand(2, 5, generator=generator)
    ours = head_token_nll(hidden, weight, bias, targets)
    grads_ours = torch.autograd.grad((ours * upstream).sum(), (hidden, weight, bias))
    plain = nn.functional.cross_entropy((hidden @ weight.T + bias).transpose(1, 2), targets, reduction="none")
    grads_plain = torch.autograd.grad((plain * upstream).sum(), (hidden, weight, bias))
    assert torch.allclose(ours, plain, atol=1e-5)
    for a, b in zip(grads_ours, grads_plain):
        assert torch.allclose(a, b, atol=1e-5)


class _ScaledLogits(nn.Module):
    """A causal LM whose logits are not lm_head(decoder(...)): scaled after the head."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits * 2.0
        return out


def test_a_model_whose_logits_are_not_the_heads_output_uses_the_plain_loss(capsys):
    model = _ScaledLogits(tiny_llama())
    for param in model.parameters():
        param.requires_grad_(False)
    model.train()
    assert causal_lm_loss._decoder_and_head(model) is None
    assert "plain" in capsys.readouterr().err
    assert model.training and all(m.training for m in model.modules())  # the check's eval() was undone
    batch = _batch()
    expected = _plain_nll(model, batch).sum(1)
    assert torch.allclose(conversation_sums(model, batch)[:, 0], expected)


def test_a_bf16_model_takes_the_chunked_path_and_scores_in_fp32():
    model = tiny_llama().to(torch.bfloat16)
    for param in model.parameters():
        param.requires_grad_(False)
    assert causal_lm_loss._decoder_and_head(model) is not None  # the logits check compares like with like
    batch = _batch()
    plain = _plain_nll(model, batch).sum(1)
    assert torch.allclose(conversation_sums(model, batch)[:, 0], plain, rtol=2e-2, atol=2e-2)


def test_backward_twice_with_retain_graph_gives_the_same_gradient():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, 8, generator=generator, requires_grad=True)
    weight = torch.randn(11, 8, generator=generator)
    loss = head_token_nll(hidden, weight, None, torch.tensor([[1, 2, -100, 3]])).sum()
    (first,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (second,) = torch.autograd.grad(loss, hidden)
    assert torch.equal(first, second) and first.abs().max() > 0
