"""grpo/checkpoint.py: a checkpoint restores weights, AdamW and the RNG exactly, pickle-free."""

import json

import pytest
import torch
from torch import nn

from grpo.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_state_tensors,
    save_checkpoint,
    step_dir,
)

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def adam_step(model, opt, x) -> None:
    model(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_resumed_optimizer_continues_bit_for_bit(tmp_path):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    model, opt = model_and_optimizer()
    for _ in range(3):
        adam_step(model, opt, x)
    path = save_checkpoint(
        step_dir(tmp_path, 3), model, opt, use_lora=False, base="unused", state={"step": 3}
    )
    draw = torch.rand(4)  # the RNG state is saved with the checkpoint
    adam_step(model, opt, x)

    fresh, fresh_opt = model_and_optimizer(seed=7)  # other weights: the checkpoint overwrites them
    meta = load_checkpoint(path, fresh, fresh_opt, use_lora=False)
    assert meta["step"] == 3 and meta["param_groups"][0]["weight_decay"] == 0.1
    assert torch.equal(torch.rand(4), draw)
    adam_step(fresh, fresh_opt, x)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert int(fresh_opt.state_dict()["state"][0]["step"]) == 4


def test_nothing_pickled_only_safetensors_and_json(tmp_path):
    model, opt = model_and_optimizer()
    adam_step(model, opt, torch.ones(2, 4))
    path = save_checkpoint(tmp_path / "ck", model, opt, use_lora=False, base="", state={"step": 1})
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ]
    json.loads((path / "trainer_state.json").read_text())
    tensors, meta = optimizer_state_tensors(opt)
    assert sorted(tensors) == [
        f"state.{p}.{k}" for p in range(4) for k in sorted(("step", "exp_avg", "exp_avg_sq"))
    ]
    assert meta["param_groups"][0]["params"] == [0, 1, 2, 3]


def test_latest_is_the_newest_complete_one(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model, opt = model_and_optimizer()
    for step in (2, 10):
        save_checkpoint(
            step_dir(tmp_path, step), model, opt, use_lora=False, base="", state={"step": step}
        )
    step_dir(tmp_path, 12).mkdir()  # a directory without its state file is not a checkpoint
    (tmp_path / "checkpoints" / ".step-000014.tmp-x").mkdir()  # nor a write in progress
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 10)
    assert step_dir(tmp_path, 10).name == "step-000010"


def test_a_checkpoint_of_other_weights_is_refused_by_name(tmp_path):
    model, opt = model_and_optimizer()
    path = save_checkpoint(tmp_path / "ck", model, opt, use_lora=False, base="", state={"step": 1})
    other = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2), nn.Linear(2, 2))
    other_opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(RuntimeError, match=r"lacks 3.weight; it was written by a different config"):
        load_checkpoint(path, other, other_opt, use_lora=False)
