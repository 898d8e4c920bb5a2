"""Every objective variant of grpo/loss.py through the real loop: a GRPO step of two passes
(the second off-policy) on the tiny model with a finite loss, finite and non-zero LoRA gradients
in both passes, and the variant's own metrics."""

import math
import shutil
from pathlib import Path

import pytest
import torch

from grpo.cli import check_run
from grpo.config import GRPOConfig
from grpo.loss import group_advantages, reward_advantages
from grpo.train import build_trainer

FAST = dict(
    model="tiny",
    warmup_sft_steps=40,  # a weak base: partial-credit rewards still differ within groups
    warmup_sft_batch_size=64,
    n_eval=16,
    prompts_per_step=4,
    num_generations=4,
    micro_batch_size=8,
    max_new_tokens=5,
    lora_r=4,
    lora_alpha=8.0,
    reward_funcs=["correctness", "digits"],  # two rewards: both aggregations differ
    reward_weights=[1.0, 0.5],
    num_iterations=2,  # the second pass is off-policy: ratios, clips and masks act
    max_steps=1,
)

# variant -> (config overrides, metrics the step must report)
VARIANTS = {
    "cispo": ({"loss_type": "cispo", "epsilon_high": 4.0}, ["cispo_capped"]),
    "sapo": ({"loss_type": "sapo"}, ["sapo_gate_mean"]),
    "luspo": ({"loss_type": "luspo", "importance_sampling_level": "sequence"}, ["clip_region"]),
    "vespo": ({"loss_type": "vespo"}, ["vespo_weight_mean"]),
    "delta": ({"delta": 1.5}, ["clip_delta"]),
    "off_policy_mask": ({"off_policy_mask_threshold": 0.01}, ["off_policy_masked"]),
    "top_entropy_quantile": (
        {"top_entropy_quantile": 0.2},
        ["entropy", "entropy_masked"],
    ),
    "entropy_coef": ({"entropy_coef": 0.01, "loss_type": "dapo"}, ["entropy"]),
    "normalize_then_sum": ({"multi_objective_aggregation": "normalize_then_sum"}, []),
}

pytestmark = pytest.mark.slow  # builds a warm-up base and trains


def fast_cfg(out, **kw) -> GRPOConfig:
    return check_run(GRPOConfig(**{**FAST, "output_dir": str(out), **kw}))


@pytest.fixture(scope="module")
def shared_base(tmp_path_factory):
    """The warmed-up tiny base, built once; each run copies it into its own output_dir."""
    out = tmp_path_factory.mktemp("base-run")
    build_trainer(fast_cfg(out))
    return out / "base"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_step_has_finite_loss_and_nonzero_lora_gradients(tmp_path, shared_base, variant):
    overrides, keys = VARIANTS[variant]
    out = tmp_path / variant
    out.mkdir()
    shutil.copytree(shared_base, Path(out) / "base")
    trainer = build_trainer(fast_cfg(out, **overrides))
    gradients = []  # per pass: (finite, sum |grad|) over the LoRA matrices, before the update

    def record(t, info):
        if info["phase"] == "forward_backward":
            grads = [p.grad for p in t.params if p.grad is not None]
            finite = all(torch.isfinite(g).all() for g in grads)
            gradients.append((finite, sum(g.abs().sum().item() for g in grads)))

    trainer.add_callback("phase_end", record)
    metrics, batch = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert metrics["ratio_mean"] != 1.0  # pass 2 ran after an update: off-policy ratios
    for key in keys:
        assert math.isfinite(metrics[key]), key
    # Entropies are computed only for the options that read them.
    assert ("entropy" in metrics) == ("entropy" in keys)
    parts = torch.stack(list(batch.reward_parts.values()), dim=1)  # [N, K]
    aggregation = overrides.get("multi_objective_aggregation", "sum_then_normalize")
    expected = reward_advantages(parts, [1.0, 0.5], 4, aggregation=aggregation)
    assert torch.equal(batch.advantages, expected)
    if aggregation == "sum_then_normalize":  # unchanged: the advantage of the weighted sum
        assert torch.equal(batch.advantages, group_advantages(batch.step_rewards, 4))
    assert batch.advantages.abs().sum() > 0  # a learning signal in this step's groups
    assert len(gradients) == 2 and all(finite for finite, _ in gradients)
    assert all(total > 0 for _, total in gradients)
