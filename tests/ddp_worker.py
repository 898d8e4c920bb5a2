"""One optimizer step on a fixed batch of rollouts; run alone or under torchrun (see
tests/test_distributed.py). Writes the LoRA weights after the step to <out>/lora.safetensors."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from grpo import distributed as dist
from grpo.checkpoint import trainable_state
from grpo.cli import check_run
from grpo.config import GRPOConfig
from grpo.rollout import generate_rollouts
from grpo.train import build_trainer


def step_and_save(run_dir: str, loss_type: str, out: str) -> None:
    cfg = check_run(
        GRPOConfig(
            model="tiny",
            output_dir=run_dir,
            loss_type=loss_type,
            prompts_per_step=8,
            num_generations=4,
            micro_batch_size=4,
            max_new_tokens=5,
            lora_r=4,
            lora_alpha=8.0,
            beta=0.04,
            learning_rate=1e-2,
            n_eval=16,
            warmup_sft_steps=150,  # the copied base was built with these (else: rebuilt)
            warmup_sft_batch_size=64,
            reward_funcs=["correctness", "digits"],
            reward_weights=[1.0, 1.0],
        )
    )
    torch.set_num_threads(1)
    trainer = build_trainer(cfg, log=lambda m: None)
    with torch.no_grad():  # a non-zero B, the same on every rank: every LoRA gradient is live
        g = torch.Generator().manual_seed(7)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    # The fixed batch: the same 32 rollouts on every rank (same seed, same model) ...
    records = trainer.task.train[:8]
    prompts = [r["prompt"] for r in records for _ in range(4)]
    torch.manual_seed(1234)
    ro = generate_rollouts(trainer.model, trainer.tokenizer, prompts, max_new_tokens=5)
    # ... of which each rank keeps its contiguous share of whole groups.
    share = len(records) // dist.world_size()
    mine = records[dist.rank() * share : (dist.rank() + 1) * share]
    rows = slice(dist.rank() * share * 4, (dist.rank() + 1) * share * 4)
    batch = trainer.score(mine, ro.select(rows))
    # Record the (all-reduced, accumulated) gradients the optimizer sees: Adam's first step is
    # nearly sign(g), so the weights alone would hide a wrong gradient scale.
    grads = {}
    names = {id(p): n for n, p in trainer.model.named_parameters()}

    def record_gradients(trainer, info):
        if info["phase"] == "forward_backward":
            grads.update({f"grad.{names[id(p)]}": p.grad.detach().clone() for p in trainer.params})

    trainer.add_callback("phase_end", record_gradients)
    trainer.update(batch)
    if dist.is_main():
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        state = trainable_state(trainer.model)
        save_file(state | grads, out)
    dist.barrier()


def main(run_dir: str, loss_type: str, out: str) -> None:
    step_and_save(run_dir, loss_type, out)  # returns with the trainer and its DDP model freed
    dist.shutdown()  # so the process group goes last (see its docstring)


if __name__ == "__main__":
    main(*sys.argv[1:4])
