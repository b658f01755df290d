"""The fused LoRA kernels, fast dropout, input rebuilding and fast mode: same math as the plain formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.ops import dropout as D
from peftkit.ops import lora as L
from peftkit.ops.attention import attention
from peftkit.ops.recompute import SavedInput, rebuild_inputs

from conftest import randomize, tiny_bert, tiny_gpt2


# ------------------------------------------------------------------------------------------ dropout masks
def test_keep_mask_rate_reproducibility_and_rows():
    torch.manual_seed(0)
    mask = D.keep_mask((1000, 997), 0.1)
    dense = mask.tensor(torch.float32)
    n = dense.numel()
    keep_p = 1 - D.effective_p(0.1)
    assert abs(dense.mean().item() - keep_p) < 5 * math.sqrt(keep_p * (1 - keep_p) / n)
    torch.manual_seed(0)
    assert torch.equal(D.keep_mask((1000, 997), 0.1).tensor(torch.float32), dense)  # follows torch.manual_seed
    assert not torch.equal(D.keep_mask((1000, 997), 0.1).tensor(torch.float32), dense)
    # rows of an unaligned width read back exactly
    for rows in (slice(0, 3), slice(5, 17), slice(990, 1000)):
        torch.testing.assert_close(mask.rows(rows, 997, torch.float32), dense[rows])
    assert D.effective_p(0.1) == round(0.1 * 65536) / 65536 and abs(D.effective_p(0.1) - 0.1) < 8e-6


def test_fast_dropout_matches_its_mask_and_gradcheck():
    x = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)

    def f(t):
        torch.manual_seed(3)
        return D.fast_dropout(t, 0.3)

    assert torch.autograd.gradcheck(f, (x,))
    torch.manual_seed(3)
    keep = D.keep_mask(x.shape, 0.3).tensor(torch.float64)
    torch.testing.assert_close(f(x), x * keep / (1 - D.effective_p(0.3)))
    assert torch.equal(D.fast_dropout(x, 0.3, training=False), x)


# -------------------------------------------------------------------------------------------- the kernels
def _reference(x, W, b, A, B, s, keep=None, scale=1.0):
    xd = x if keep is None else x * keep * scale
    return F.linear(x, W, b) + s * F.linear(F.linear(xd, A), B)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_merged_kernel_matches_reference(transposed, with_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 6, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if with_bias else None
    A = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    stored = W.t().contiguous() if transposed else W
    f = lambda x, A, B, *bias: L.merged_lora_linear(x, stored, bias[0] if bias else None, A, B, 0.7, transposed)
    inputs = (x, A, B) + ((b,) if with_bias else ())
    assert torch.autograd.gradcheck(f, inputs)
    torch.testing.assert_close(f(*inputs), _reference(x, W, b, A, B, 0.7))


def test_dropout_kernels_match_reference_with_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 40, 16, dtype=torch.float64, requires_grad=True)  # 120 rows: several chunks below
    W = torch.randn(8, 16, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    A = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    B = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)

    def fused(x, A, B):
        torch.manual_seed(5)
        keep, scale = L.dropout_keep(x, 0.25)
        h = L.lora_down(x, keep, scale, A)
        return L.base_up(x, W, b, h, B, A, keep, 1.5, scale)

    old = L.CHUNK_ELEMENTS
    L.CHUNK_ELEMENTS = 16 * 16  # force chunking
    try:
        assert torch.autograd.gradcheck(fused, (x, A, B))
        torch.manual_seed(5)
        keep = L.dropout_keep(x, 0.25)[0].tensor(torch.float64).view(x.shape)
        expected = _reference(x, W, b, A, B, 1.5, keep, 1 / (1 - D.effective_p(0.25)))
        torch.testing.assert_close(fused(x, A, B), expected)
    finally:
        L.CHUNK_ELEMENTS = old


def test_siblings_share_one_mask_and_match_separate_layers():
    """q, k, v of one attention block with shared_dropout_mask: one mask, and each output equals its own formula
    with that mask."""
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=4, dropout=0.3, target_modules=["query", "key", "value"],
                                                          shared_dropout_mask=True))
    randomize(model, scale=0.2)
    block = model.base_model.bert.encoder.layer[0].attention.self
    assert block.query.siblings is block.key.siblings is block.value.siblings is not None
    model.train()
    x = torch.randn(2, 7, 32)
    torch.manual_seed(11)
    outs = [block.query(x), block.key(x), block.value(x)]
    torch.manual_seed(11)
    keep = D.keep_mask((14, 32), 0.3).tensor(torch.float32).view(2, 7, 32)
    scale = 1 / (1 - D.effective_p(0.3))
    for layer, out in zip((block.query, block.key, block.value), outs):
        base = layer.base_layer
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(out, _reference(x, base.weight, base.bias, A, B, layer.scaling["default"], keep, scale))
    # a sibling that sees another tensor computes its own
    other = torch.randn(2, 7, 32)
    assert not torch.allclose(block.key(other), block.key(x))


def test_inference_merges_on_the_fly_and_matches_the_plain_formula():
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=4, target_modules="all-linear"))
    randomize(model, scale=0.2)
    model.eval()
    ids = torch.randint(0, 100, (16, 40))  # enough tokens for W + sBA to pay off
    with torch.no_grad():
        fused = model(input_ids=ids).logits
    for _, layer in model.adapter_layers():
        layer.fused_adapter = lambda x, active=None: None  # force the plain formula
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- rebuilding inputs
def _grads(model, inputs, checkpointing=False):
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    torch.manual_seed(7)
    model(**inputs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_rebuilt_inputs_give_the_same_gradients_as_stored_ones(dropout):
    inputs = {"input_ids": torch.randint(0, 100, (2, 9)), "labels": torch.tensor([0, 2])}
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=4, dropout=dropout, target_modules="all-linear"))
    randomize(model, scale=0.1)
    rebuilt = _grads(copy.deepcopy(model), inputs)
    rebuild_inputs(False)
    try:
        stored = _grads(copy.deepcopy(model), inputs)
    finally:
        rebuild_inputs(True)
    checkpointed = _grads(copy.deepcopy(model), inputs, checkpointing=True)
    assert rebuilt.keys() == stored.keys() == checkpointed.keys()
    for name in rebuilt:
        torch.testing.assert_close(rebuilt[name], stored[name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(checkpointed[name], stored[name], atol=1e-6, rtol=1e-5)


def test_layer_norm_and_gelu_outputs_are_rebuilt_not_stored():
    ln, x = torch.nn.LayerNorm(8), torch.randn(4, 8, requires_grad=True)

    class Ctx:
        pass

    for made in (ln(x), F.gelu(x)):
        saved = SavedInput(Ctx(), made)
        assert saved.count == 0 and saved.node is made.grad_fn
        torch.testing.assert_close(saved.restore(()).rows_of(slice(0, 4)), made.detach(), atol=0, rtol=0)
    plain = SavedInput(Ctx(), x * 2)  # an op without a recipe: stored
    assert plain.count == 1
    # nothing tensor-valued stays on the context object between forward and backward
    ctx = Ctx()
    saved = SavedInput(ctx, x * 2)
    assert len(saved.tensors(ctx)) == 1 and not any(torch.is_tensor(v) for v in vars(ctx).values())
    assert not any(torch.is_tensor(v) for v in vars(saved).values())


# -------------------------------------------------------------------------------------------- fast mode
def test_attention_with_fast_dropout_gradcheck_and_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 1, 5, 5, dtype=torch.float64)

    def f(q, k, v):
        torch.manual_seed(0)
        return attention(q, k, v, mask, dropout=0.3)

    assert torch.autograd.gradcheck(f, (q, k, v))
    torch.manual_seed(0)
    keep = D.keep_mask((2, 3, 5, 5), 0.3).tensor(torch.float64)
    expected = torch.softmax(q @ k.transpose(-1, -2) * 0.5 + mask, -1) * keep / (1 - D.effective_p(0.3)) @ v
    torch.testing.assert_close(f(q, k, v), expected)
    torch.testing.assert_close(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2])
def test_fast_training_is_identical_without_dropout_and_reversible(build):
    model = peftkit.adapt(build(), peftkit.LoraConfig(r=4, dropout=0.1, target_modules="all-linear"))
    randomize(model, scale=0.1)
    reference = copy.deepcopy(model)
    peftkit.fast_training(model)
    assert any(type(m).__name__ == "FastDropout" for m in model.modules())
    ids = torch.randint(0, 100, (2, 9))
    model.eval(), reference.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=0, rtol=0)
    model.train()
    model(input_ids=ids).logits.float().pow(2).mean().backward()  # trains with the fast masks
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    peftkit.fast_training(model, False)
    assert not any(type(m).__name__ == "FastDropout" for m in model.modules())
    assert model.base_model.config._attn_implementation == reference.base_model.config._attn_implementation


def test_bf16_base_with_fp32_master_adapters():
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=4, dropout=0.1, target_modules="all-linear"))
    model.cast_frozen(torch.bfloat16).train()
    assert model.base_model.bert.encoder.layer[0].attention.self.query.base_layer.weight.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=torch.randint(0, 100, (2, 9)), labels=torch.tensor([0, 1]))
    out.loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trainable)
    assert all(torch.isfinite(p.grad).all() for p in trainable)


def test_row_chunks_cover_every_row_once_aligned_and_near_the_budget():
    from peftkit.ops.chunks import row_chunks

    for rows, width, elements, align in [(100, 7, 50, 8), (3, 1000, 10, 1), (1816 + 232, 576, 1 << 20, 8), (0, 5, 9, 1)]:
        parts = list(row_chunks(rows, width, elements, align))
        assert [i for p in parts for i in range(p.start, p.stop)] == list(range(rows))
        assert all((p.stop - p.start) % align == 0 and p.stop - p.start >= align for p in parts[:-1])
        assert all((p.stop - p.start) * width <= max(elements, align * width) for p in parts)
