"""NF4Linear, LoRALinear and model surgery: exact formulas, gradients, reference policy, merging."""

import copy
import math

import pytest
import torch
from torch import nn

from bench.qlora_timing import bnb_linear4bit, saved_bytes
from grpo.tiny.build import build_tiny_phi
from qlora import (
    LoRALinear,
    NF4Linear,
    adapters_disabled,
    dequantize_nf4,
    footprint,
    merge_adapters,
    prepare_qlora,
    trainable_parameters,
)


def linear(in_f=128, out_f=96, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def tokens(seed=0, shape=(2, 12)):
    return torch.randint(4, 90, shape, generator=torch.Generator().manual_seed(seed))


def randomize_lora_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))


@pytest.fixture
def tiny():
    model, _ = build_tiny_phi(seed=0)
    return model.eval()


# --- NF4Linear ----------------------------------------------------------------------------------


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


def reference_lora(layer: LoRALinear, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """base(x) + s B A d(x) through plain autograd (the same dropout mask, or none)."""
    dx = x.float() if mask is None else x.float() * mask * (1.0 / (1.0 - layer.dropout))
    update = (dx @ layer.lora_A.weight.T) @ layer.lora_B.weight.T * layer.scaling
    return layer.base(x) + update.to(x.dtype)


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


def test_prepare_qlora_wraps_every_phi_linear_and_freezes_the_rest(tiny):
    n_params = sum(p.numel() for p in tiny.parameters())
    model = prepare_qlora(tiny, r=16, alpha=32)
    assert model is tiny
    assert not any(m.training for m in model.modules())  # an eval model stays in eval mode
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(lora) == 4 * 6  # q, k, v, dense, fc1, fc2 in each of 4 layers
    assert all(isinstance(m.base, NF4Linear) for m in lora.values())
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.embed_tokens) is nn.Embedding
    trainable, total = trainable_parameters(model)
    # per layer: q, k, v, dense r*(128+128) each, fc1 and fc2 r*(128+512) each
    assert trainable == 4 * (4 * 16 * 256 + 2 * 16 * 640) == 147456
    assert total == n_params + trainable
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in names)
    summary = model.qlora_summary
    assert summary["trainable_params"] == trainable and summary["quantized_modules"] == 24
    assert summary["stored_bytes"] == footprint(model)["bytes"] < 4 * total
    assert model.qlora_config.r == 16 and model.qlora_config.target_modules[0] == "q_proj"


def test_prepare_qlora_refuses_names_the_model_does_not_have(tiny):
    with pytest.raises(ValueError, match=r"'gate_proj' matches no module of PhiForCausalLM.*'fc1'"):
        prepare_qlora(tiny, target_modules=("q_proj", "gate_proj"))
    assert not any(isinstance(m, LoRALinear) for m in tiny.modules())  # untouched
    with pytest.raises(ValueError, match=r"matched model.layers.0.self_attn, a PhiAttention"):
        prepare_qlora(tiny, target_modules=("self_attn",))
    prepare_qlora(tiny, target_modules=("q_proj",))
    with pytest.raises(ValueError, match=r"already has a LoRA adapter"):
        prepare_qlora(tiny, target_modules=("q_proj",))


def test_targeting_lm_head_adds_lora_but_never_quantizes_it(tiny):
    prepare_qlora(tiny, target_modules=("lm_head", "fc1"))
    assert type(tiny.lm_head.base) is nn.Linear
    assert isinstance(tiny.model.layers[0].mlp.fc1.base, NF4Linear)


def test_gradients_reach_only_lora_and_the_bytes_never_change(tiny):
    model = prepare_qlora(tiny, dropout=0.0)
    model.train()
    frozen = {
        n: m.qweight.packed.clone() for n, m in model.named_modules() if isinstance(m, NF4Linear)
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    for name, p in model.named_parameters():
        is_lora = name.endswith(("lora_A.weight", "lora_B.weight"))
        assert (p.grad is not None) == is_lora, name
    assert all(
        torch.count_nonzero(m.lora_B.weight) > 0
        for m in model.modules()
        if isinstance(m, LoRALinear)
    )
    for name, m in model.named_modules():
        if isinstance(m, NF4Linear):
            assert torch.equal(m.qweight.packed, frozen[name]), name


# --- adapters_disabled --------------------------------------------------------------------------


def test_adapters_disabled_gives_the_quantized_base_exactly(tiny):
    model = prepare_qlora(tiny)
    randomize_lora_b(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.zero_()
    ids = tokens()
    with torch.no_grad():
        policy = model(ids).logits
        base = reference(ids).logits
        with adapters_disabled(model) as same:
            assert same is model
            assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids).logits, policy)
    assert not torch.allclose(policy, base, atol=1e-3)


def test_adapters_disabled_nests_and_restores_on_exception(tiny):
    model = prepare_qlora(tiny)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    layers[0].disabled = True  # a layer someone switched off before stays off
    with pytest.raises(RuntimeError, match="boom"):
        with adapters_disabled(model):
            with adapters_disabled(model):
                assert all(m.disabled for m in layers)
            assert all(m.disabled for m in layers)
            raise RuntimeError("boom")
    assert layers[0].disabled and not any(m.disabled for m in layers[1:])


def test_adapters_disabled_without_adapters_is_an_error(tiny):
    with pytest.raises(ValueError, match=r"no LoRA layers.*call prepare_qlora"):
        with adapters_disabled(tiny):
            pass


# --- merge_adapters -----------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [True, False])
def test_merge_adapters_returns_a_plain_model_with_the_same_logits(tiny, quantize):
    model = prepare_qlora(tiny, quantize=quantize)
    randomize_lora_b(model)
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
        merged = merge_adapters(model)
        got = merged(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not any(isinstance(m, (LoRALinear, NF4Linear)) for m in merged.modules())
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    assert not hasattr(merged, "qlora_config")
    # the input model is untouched and still an adapter model
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_generate_under_inference_mode_then_train(tiny):
    """Decode buffers first created under inference_mode must still be writable when training."""
    model = prepare_qlora(tiny)
    ids = tokens(shape=(1, 6))
    with torch.inference_mode():
        first = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    with torch.inference_mode():
        again = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert first.shape == (1, 9) and torch.equal(first, again)
