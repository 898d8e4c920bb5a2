"""Tests for qlora/layers.py: NF4Linear (decode then matmul, equal to bitsandbytes Linear4bit) and
LoRALinear (the formula, its gradients, dropout, rslora)."""

import copy
import math

import pytest
import torch
from conftest import linear
from torch import nn

from bench.layer_speed import bnb_linear4bit, saved_bytes
from qlora import (
    LoRALinear,
    NF4Linear,
    dequantize_nf4,
)


def reference_lora(layer: LoRALinear, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """base(x) + s B A d(x) through plain autograd (the same dropout mask, or none)."""
    dx = x.float() if mask is None else x.float() * mask * (1.0 / (1.0 - layer.dropout))
    update = (dx @ layer.lora_A.weight.T) @ layer.lora_B.weight.T * layer.scaling
    return layer.base(x) + update.to(x.dtype)


def test_nf4linear_forward_is_dequantize_then_matmul():
    lin = linear()
    layer = NF4Linear.from_linear(lin)
    x = torch.randn(3, 5, 128)
    reference = nn.functional.linear(x, dequantize_nf4(layer.qweight), lin.bias)
    # with a gradient to carry: decode + F.linear, bit for bit
    y = layer(x.clone().requires_grad_())
    assert y.shape == (3, 5, 96) and y.dtype == torch.float32
    assert torch.equal(y, reference)
    # inference: the fused kernel for these 15 rows, the same weights summed in another order
    # (tests/test_kernel.py holds it to the float32 bound)
    with torch.no_grad():
        assert torch.allclose(layer(x), reference, rtol=1e-5, atol=1e-5)
    rel = (y - lin(x)).norm() / lin(x).norm()
    assert 0.0 < rel < 0.15  # 4-bit weights: close to, not equal to, the float layer


def test_nf4linear_equals_bitsandbytes_linear4bit_forward_and_backward():
    lin = linear(256, 192)
    ours, theirs = NF4Linear.from_linear(lin), bnb_linear4bit(lin, torch.float32)
    x = torch.randn(7, 256)
    with torch.no_grad():  # our fused kernel against bnb's dequantize + matmul: sum order only
        assert torch.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(7, 192)
    ya, yb = ours(xa), theirs(xb)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)


def test_nf4linear_backward_gives_grad_input_only_and_saves_no_weight():
    lin = linear(512, 384)
    layer = NF4Linear.from_linear(lin)
    packed = layer.qweight.packed.clone()
    x = torch.randn(4, 512, requires_grad=True)
    grad = torch.randn(4, 384)
    layer(x).backward(grad)
    assert torch.allclose(x.grad, grad @ dequantize_nf4(layer.qweight), atol=1e-6)
    assert layer.bias.grad is None and not layer.bias.requires_grad
    assert [p for p in layer.parameters() if p.requires_grad] == []
    assert torch.equal(layer.qweight.packed, packed)
    # autograd keeps nothing for NF4Linear: W is decoded again in backward
    assert saved_bytes(layer, x) == 0
    weight_bytes = 512 * 384 * 4
    assert saved_bytes(LoRALinear(layer, r=8, alpha=16), x) < weight_bytes / 20  # x only
    assert saved_bytes(LoRALinear(lin.requires_grad_(False), r=8, alpha=16), x) >= weight_bytes


def test_nf4linear_to_dtype_never_casts_quantized_storage():
    layer = NF4Linear.from_linear(linear(), double_quant=False)
    before = copy.deepcopy(layer.qweight)
    x = torch.randn(2, 128)
    y = layer(x)
    layer.to(torch.bfloat16)
    assert layer.qweight.absmax.dtype == torch.float32
    assert torch.equal(layer.qweight.absmax, before.absmax)
    assert torch.equal(layer.qweight.packed, before.packed)
    assert layer.bias.dtype == torch.bfloat16  # plain parameters follow .to as usual
    assert torch.allclose(layer(x), y, atol=1e-2)  # bias rounded to bf16, still fp32 compute


def test_nf4linear_bfloat16_compute():
    lin = linear()
    layer = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    x = torch.randn(4, 128)
    y = layer(x)
    assert y.dtype == torch.float32  # cast back to the input dtype, as bitsandbytes does
    reference = NF4Linear.from_linear(lin)(x)
    assert torch.allclose(y, reference, atol=0.05, rtol=0.02) and not torch.equal(y, reference)


# --- LoRALinear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_starts_as_noop_and_follows_the_formula(quantized):
    lin = linear()
    base = NF4Linear.from_linear(lin) if quantized else lin
    layer = LoRALinear(base, r=8, alpha=16).eval()
    x = torch.randn(6, 128)
    assert torch.equal(layer(x), base(x))  # B = 0
    bound = 1 / math.sqrt(128)  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > 0.4 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    expected = base(x) + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)  # 16 / 8
    assert torch.allclose(layer(x), expected, atol=1e-5)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.shape == (8, 128) and layer.lora_B.weight.shape == (96, 8)


def test_scaling_lora_and_rslora():
    assert LoRALinear(linear(), r=16, alpha=32).scaling == 2.0  # alpha / r
    assert LoRALinear(linear(), r=16, alpha=32, use_rslora=True).scaling == 8.0  # alpha/sqrt(r)


def test_lora_dropout_acts_in_train_mode_only():
    layer = LoRALinear(linear(), r=8, alpha=16, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(16, 128)
    assert not torch.equal(layer.train()(x), layer.train()(x))
    assert torch.equal(layer.eval()(x), layer.eval()(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_gradients_equal_plain_autograd(dtype, dropout):
    """The hand-written backward gives autograd's gradients for A, B and x (both dtypes, with and
    without dropout: the mask native_dropout drew in forward is reused)."""
    base = NF4Linear.from_linear(linear(), compute_dtype=dtype)
    layer = LoRALinear(base, r=8, alpha=16, dropout=dropout).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_(generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 7, 128, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(2, 7, 96, dtype=dtype)
    seed = torch.seed()
    y = layer(x)
    y.backward(grad_y)
    ours = [x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()]
    mask = None
    if dropout:
        torch.manual_seed(seed)  # the same draw as in forward
        _, mask = torch.native_dropout(x.detach().float(), dropout, True)
    x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    expected_y = reference_lora(layer, x, mask)
    expected_y.backward(grad_y)
    theirs = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    assert torch.equal(y, expected_y)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for name, a, b in zip(("x", "A", "B"), ours, theirs, strict=True):
        assert torch.allclose(a.float(), b.float(), **tol), name


def test_lora_keeps_its_input_once_in_its_own_dtype():
    """Four adapters reading one bf16 x (q, k, v, fc1 in a Phi block) keep x once, as bf16; no
    float32 copy of it is saved for backward."""
    layers = [
        LoRALinear(NF4Linear.from_linear(linear(seed=i), compute_dtype=torch.bfloat16), 8, 16)
        for i in range(4)
    ]
    x = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
    storages: dict[int, tuple[int, torch.dtype]] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sum(layer(x).sum() for layer in layers)
    activations = {k: v for k, v in storages.items() if v[0] >= 64 * 128 * 2}
    assert list(activations.values()) == [(64 * 128 * 2, torch.bfloat16)]


def test_lora_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"r=0 must be a positive int"):
        LoRALinear(linear(), r=0, alpha=16)
    with pytest.raises(ValueError, match=r"alpha=0 must be > 0"):
        LoRALinear(linear(), r=8, alpha=0)
    with pytest.raises(ValueError, match=r"dropout=1.0 must be in \[0, 1\)"):
        LoRALinear(linear(), r=8, alpha=16, dropout=1.0)
    with pytest.raises(TypeError, match=r"got Embedding"):
        LoRALinear(nn.Embedding(4, 4), r=8, alpha=16)


# --- prepare_qlora ------------------------------------------------------------------------------
