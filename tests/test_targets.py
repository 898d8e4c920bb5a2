"""Tests for qlora/targets.py: `auto` and `all-linear` expanded to a model's own linear names, on
a tiny Phi (the Llama table is exercised on real SmolLM2 weights in test_pretrained.py)."""

import pytest
from torch import nn

from grpo.tiny.build import build_tiny_phi
from qlora import LoRALinear, prepare_qlora
from qlora.targets import LLAMA_TARGETS, PHI_TARGETS, expand_targets

LLAMA_BLOCK = [f"model.layers.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
LLAMA_BLOCK += [f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]


def test_expand_keeps_order_drops_repeats_and_never_takes_the_head():
    paths = [*LLAMA_BLOCK, "lm_head"]
    assert expand_targets(["auto"], paths, "llama") == LLAMA_TARGETS
    assert expand_targets(["all-linear"], paths, "llama") == tuple(sorted(LLAMA_TARGETS))
    assert expand_targets(["o_proj", "auto"], paths, "llama") == (
        "o_proj", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj",
    )  # fmt: skip
    assert expand_targets(["auto", "lm_head"], paths, "llama")[-1] == "lm_head"  # named: kept
    assert expand_targets("fc9", paths) == ("fc9",)  # plain names pass through unchecked
    with pytest.raises(ValueError, match=r"architecture 'gpt2'.*down_proj, gate_proj"):
        expand_targets(["auto"], paths, "gpt2")


@pytest.mark.parametrize("keyword", ["auto", "all-linear"])
def test_keywords_on_a_phi_adapt_its_six_linears_per_block(keyword):
    model, _ = build_tiny_phi(seed=0)
    prepare_qlora(model, (keyword,), r=4)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 4 * 6  # 4 layers x q, k, v, dense, fc1, fc2
    assert type(model.lm_head) is nn.Linear  # the output head is never a target of either
    want = PHI_TARGETS if keyword == "auto" else tuple(sorted(PHI_TARGETS))
    assert model.qlora_config.target_modules == want  # the adapter config lists plain names
