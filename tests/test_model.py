"""Tests for qlora/model.py: prepare_qlora on a tiny Phi, adapters_disabled (the exact base),
merge_adapters, and that only LoRA trains."""

import copy

import pytest
import torch
from conftest import randomize_lora_b, tokens
from torch import nn

from grpo.tiny.build import build_tiny_phi
from qlora import (
    LoRALinear,
    NF4Linear,
    adapters_disabled,
    footprint,
    merge_adapters,
    prepare_qlora,
    trainable_parameters,
)


@pytest.fixture
def tiny():
    model, _ = build_tiny_phi(seed=0)
    return model.eval()


# --- NF4Linear ----------------------------------------------------------------------------------


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
