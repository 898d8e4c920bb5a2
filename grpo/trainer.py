"""The GRPO loop: sample a group per prompt, score it, weigh it against its own group, update.

One step, for a generation batch of `prompts_per_step` prompts and G = `num_generations`:

    1. rollouts     G completions per prompt, sampled with the current policy   [N = prompts * G]
    2. rewards      r = sum_k w_k * reward_k(prompt, completion)                 [N]
    3. advantages   A = group_advantages(r, G)                                   [N]
    4. reference    logp_ref with the adapters disabled (only when beta > 0)     [N, C]
    5. old policy   logp_old before any update (only when num_iterations > 1)    [N, C]
    6. for each of num_iterations passes, for each micro-batch:
           logp = completion_logps(policy); loss = grpo_loss(...) * share; loss.backward()
       then clip the gradient norm, set the step's learning rate, optimizer step.

`make_batch` does 1-3 and returns a `Batch`; `update` does 4-6 on it. Only the LoRA matrices train
in QLoRA mode (the NF4 base is frozen); with `use_lora: false` the whole (unquantized) model
trains, and the reference is a frozen copy.

Hooks (minGPT's `add_callback`): `trainer.add_callback(event, fn)` calls `fn(trainer, info)` at
    "step_start"  {"step": the step about to run, counted from 1}
    "phase_end"   {"phase": name, "seconds": float}, phases in order "generation", "reference"
                  (also at beta 0: then ~0 s), "forward_backward", "optimizer" (the last two once
                  per pass when num_iterations > 1); "forward_backward" ends after the gradient
                  clipping, before the optimizer step, so a hook there sees the final gradients
    "step_end"    the step's metrics dict
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo import checkpoint
from grpo import distributed as dist
from grpo.config import ConfigError, GRPOConfig
from grpo.loss import constant_groups, group_advantages, grpo_loss
from grpo.model import base_path, build_policy, resolve_device
from grpo.rewards import combine_rewards
from grpo.rollout import Rollout, completion_logps, generate_rollouts
from grpo.warmup import ensure_tiny_base
from qlora import adapters_disabled, release_freed_memory, return_large_frees_to_os

EVENTS = ("step_start", "phase_end", "step_end")


def learning_rate(cfg: GRPOConfig, step: int) -> float:
    """The learning rate of the optimizer step after `step` completed steps (step counts from 0):

        lr(s) = learning_rate * f(s),   W = int(warmup_ratio * max_steps)
        f(s)  = (s + 1) / (W + 1)                                        if s < W
        f(s)  = max(0, 1 - p) | (1 + cos(pi * min(1, p))) / 2 | 1        linear | cosine | constant
                with p = (s - W) / max(1, max_steps - W)

    A function of the step alone, so a resumed run continues on exactly the same curve."""
    warm = int(cfg.warmup_ratio * cfg.max_steps)
    progress = (step - warm) / max(1, cfg.max_steps - warm)
    if step < warm:
        factor = (step + 1) / (warm + 1)
    elif cfg.lr_schedule == "linear":
        factor = max(0.0, 1.0 - progress)
    elif cfg.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    else:
        factor = 1.0
    return cfg.learning_rate * factor


@dataclass
class Batch:
    """One step's rollouts on this process: N = len(records) * G rows, each group contiguous."""

    records: list[dict]  # this process's prompts, {"prompt", "answer", ...} each
    answers: list[str]  # [N] the gold answer of each row
    rollout: Rollout  # [N] completions, their masks and truncation flags
    rewards: torch.Tensor  # [N] weighted reward sum
    reward_parts: dict[str, torch.Tensor]  # reward name -> [N] its unweighted values
    step_rewards: torch.Tensor  # [N * world] every process's rewards, in rank order
    advantages: torch.Tensor  # [N] group_advantages(step_rewards, G), this process's rows
    no_signal: torch.Tensor  # [N * world / G] bool: constant_groups(step_rewards, G)
    generation_seconds: float = 0.0


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig, log=None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.log = log or (lambda msg: print(msg, flush=True))
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            return_large_frees_to_os()  # freed activations leave the resident set, not the heap
        dist.init_from_env(self.device.type)
        if self.device.type == "cuda" and dist.world_size() > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if cfg.prompts_per_step % dist.world_size():
            raise ConfigError(
                f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the "
                f"{dist.world_size()} processes, so no group is split across ranks"
            )
        self.task = cfg.load_task()
        if cfg.model == "tiny":
            if dist.is_main():  # one rank builds the cached base, the others wait and load it
                ensure_tiny_base(cfg, self.task, log=self.log)
            dist.barrier()
        torch.manual_seed(cfg.seed)  # LoRA init: identical on every rank
        self.model, self.tokenizer, self.reference = build_policy(cfg, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ddp = None
        self.forward_model = self.model  # what the loss forward goes through (DDP when > 1 rank)
        if dist.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            # NF4 codes are buffers that never change: no need to broadcast them every forward.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, ids, broadcast_buffers=False)
            self.forward_model = self.ddp
        self.opt = torch.optim.AdamW(
            self.params, lr=learning_rate(cfg, 0), weight_decay=cfg.weight_decay
        )
        self.reward_fns, self.reward_weights = cfg.build_rewards()
        self.step = 0  # completed optimizer steps
        self.no_signal_streak = 0
        self.callbacks: dict[str, list[Callable]] = defaultdict(list)

    # ---- hooks ----------------------------------------------------------------------------
    def add_callback(self, event: str, fn: Callable[[GRPOTrainer, dict], None]) -> None:
        """Call `fn(trainer, info)` at `event` (one of EVENTS; the module docstring lists them)."""
        if event not in EVENTS:
            raise ValueError(f"event={event!r} is not one of {', '.join(EVENTS)}")
        self.callbacks[event].append(fn)

    def emit(self, event: str, info: dict) -> None:
        for fn in self.callbacks[event]:
            fn(self, info)

    def phase_end(self, phase: str, t0: float) -> float:
        seconds = time.perf_counter() - t0
        self.emit("phase_end", {"phase": phase, "seconds": seconds})
        return seconds

    # ---- one GRPO step ---------------------------------------------------------------------
    def train_step(self) -> tuple[dict, Batch]:
        """One GRPO step, make_batch then update: the step's metrics and the batch it used."""
        t0 = time.perf_counter()
        self.emit("step_start", {"step": self.step + 1})
        batch = self.make_batch()
        metrics = self.update(batch)
        if self.device.type == "cpu":
            release_freed_memory()  # the step's activations leave the resident set
        metrics["step_seconds"] = time.perf_counter() - t0
        self.emit("step_end", metrics)
        return metrics, batch

    def sample_prompts(self, step: int) -> list[dict]:
        """This rank's prompts for `step`: a function of (seed, step) alone, so a resumed run sees
        the same. The step's prompts_per_step prompts are cut into world_size contiguous shares."""
        rng = random.Random(self.cfg.seed * 1_000_003 + step)
        records = rng.sample(self.task.train, self.cfg.prompts_per_step)
        share = self.cfg.prompts_per_step // dist.world_size()
        return records[dist.rank() * share : (dist.rank() + 1) * share]

    def make_batch(self) -> Batch:
        """Steps 1-3 for this rank's prompts: generate, score, advantages."""
        cfg, t0 = self.cfg, time.perf_counter()
        # Sampling seed: reproducible on resume, different on each rank.
        torch.manual_seed(cfg.seed * 1_000_003 + self.step * 1_009 + dist.rank())
        records = self.sample_prompts(self.step)
        prompts = [r["prompt"] for r in records for _ in range(cfg.num_generations)]  # [N]
        ro = generate_rollouts(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            min_new_tokens=cfg.min_new_tokens,
        )
        return self.score(records, ro, self.phase_end("generation", t0))

    def score(self, records: list[dict], ro: Rollout, generation_seconds: float = 0.0) -> Batch:
        """Steps 2-3: rewards of rollouts `ro` (G rows per record, in order) and advantages over
        the whole step's batch (every rank's rewards), then this rank's rows."""
        G, N = self.cfg.num_generations, len(ro)
        prompts = [r["prompt"] for r in records for _ in range(G)]  # [N]
        answers = [r["answer"] for r in records for _ in range(G)]  # [N]
        rewards, parts = combine_rewards(
            self.reward_fns,
            self.reward_weights,
            prompts,
            ro.completions,
            answer=answers,
            completion_lengths=ro.completion_mask.sum(dim=1).tolist(),
        )
        step_rewards = dist.all_gather_cat(rewards.float().to(self.device)).cpu()  # [N * world]
        advantages = group_advantages(step_rewards, G, scale=self.cfg.scale_rewards)
        mine = advantages[dist.rank() * N : (dist.rank() + 1) * N].to(self.device)  # [N]
        no_signal = constant_groups(step_rewards, G)
        return Batch(
            records, answers, ro, rewards, parts, step_rewards, mine, no_signal, generation_seconds
        )

    def update(self, batch: Batch) -> dict:
        """Steps 4-6 on `batch` (from make_batch, or any fixed rollouts): one optimizer step."""
        cfg, ro, N, t0 = self.cfg, batch.rollout, len(batch.rollout), time.perf_counter()
        loss_mask = ro.completion_mask.clone()  # [N, C]
        if cfg.mask_truncated_completions:
            loss_mask[ro.truncated] = 0  # DAPO: a cut-off answer says nothing about its ending
        num_items = int(dist.all_reduce_sum(int(loss_mask.sum()), self.device))
        ref_logps = self.reference_logps(ro) if cfg.beta > 0 else None  # [N, C]
        old_logps = self.policy_logps_nograd(ro) if cfg.num_iterations > 1 else None  # [N, C]
        seconds = {"reference": self.phase_end("reference", t0)}
        seconds |= {"forward_backward": 0.0, "optimizer": 0.0}
        lr, stats_acc = learning_rate(cfg, self.step), defaultdict(float)
        starts = range(0, N, cfg.micro_batch_size)
        self.model.train()
        for _ in range(cfg.num_iterations):
            t0 = time.perf_counter()
            for start in starts:
                rows = slice(start, min(N, start + cfg.micro_batch_size))
                part = ro.select(rows)
                # DDP all-reduces on the last micro-batch only (gradient accumulation).
                sync = self.ddp is None or start == starts[-1]
                with contextlib.nullcontext() if sync else self.ddp.no_sync():
                    logps = completion_logps(self.forward_model, part, cfg.temperature)  # [n, C]
                    loss, stats = grpo_loss(
                        logps,
                        None if old_logps is None else old_logps[rows],
                        None if ref_logps is None else ref_logps[rows],
                        batch.advantages[rows],
                        loss_mask[rows],
                        loss_type=cfg.loss_type,
                        epsilon_low=cfg.epsilon_low,
                        epsilon_high=cfg.epsilon_high,
                        beta=cfg.beta,
                        importance_sampling_level=cfg.importance_sampling_level,
                        max_completion_length=cfg.max_new_tokens,
                        num_items_in_batch=num_items,
                    )
                    # Per-sequence and per-micro-batch means weigh in by their share of the
                    # rank's batch, so the accumulated gradient is the full-batch one; "dapo"
                    # already divides by the global token count, so it undoes DDP's average.
                    share = dist.world_size() if cfg.loss_type == "dapo" else len(part) / N
                    (loss * share).backward()
                for k, v in {**stats, "loss": loss.item()}.items():
                    stats_acc[k] += v * len(part) / (N * cfg.num_iterations)
            grad_norm = self.clip_gradients()
            seconds["forward_backward"] += self.phase_end("forward_backward", t0)
            t0 = time.perf_counter()
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            seconds["optimizer"] += self.phase_end("optimizer", t0)
        self.step += 1
        self.check_signal(batch.no_signal.float().mean().item())
        return self.metrics(batch, lr, grad_norm, seconds, stats_acc)

    def clip_gradients(self) -> float:
        """The gradient's global L2 norm before clipping (clipped to max_grad_norm when > 0)."""
        if self.cfg.max_grad_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        grads = [p.grad.norm() for p in self.params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads)))

    def metrics(self, batch: Batch, lr, grad_norm, seconds: dict, stats: dict) -> dict:
        ro, N, W = batch.rollout, len(batch.rollout), dist.world_size()
        lengths = ro.completion_mask.sum(dim=1)  # [N]
        correct = [
            self.task.is_correct(c, a) for c, a in zip(ro.completions, batch.answers, strict=True)
        ]

        def mean_over_ranks(total: float) -> float:
            return dist.all_reduce_sum(total, self.device) / (N * W)

        gen = batch.generation_seconds
        metrics = {
            "step": self.step,
            "reward": batch.step_rewards.mean().item(),
            "reward_std": batch.step_rewards.std().item(),
            "accuracy": mean_over_ranks(sum(correct)),
            "frac_reward_zero_std": batch.no_signal.float().mean().item(),
            "completion_length": mean_over_ranks(lengths.sum().item()),
            "completion_length_max": int(lengths.max()),
            "truncated_frac": mean_over_ranks(ro.truncated.sum().item()),
            "lr": lr,
            "grad_norm": grad_norm,
            "step_seconds": gen + sum(seconds.values()),  # train_step: the whole call's wall time
            "generation_seconds": gen,
            **{f"{phase}_seconds": s for phase, s in seconds.items()},
            "update_seconds": seconds["forward_backward"] + seconds["optimizer"],
            "generated_tokens": int(lengths.sum()),  # this process's completion tokens
            "generated_tokens_per_second": lengths.sum().item() / max(1e-9, gen),
            **stats,
        }
        for name, values in batch.reward_parts.items():
            metrics[f"reward/{name}"] = values.mean().item()
            metrics[f"reward/{name}_std"] = values.std().item()
        return metrics

    @torch.no_grad()
    def reference_logps(self, ro: Rollout) -> torch.Tensor:
        if self.reference is not None:
            return self._chunked_logps(self.reference, ro)
        with adapters_disabled(self.model):
            return self._chunked_logps(self.model, ro)

    @torch.no_grad()
    def policy_logps_nograd(self, ro: Rollout) -> torch.Tensor:
        return self._chunked_logps(self.model, ro)

    def _chunked_logps(self, model, ro: Rollout) -> torch.Tensor:
        mb = self.cfg.micro_batch_size
        parts = [
            completion_logps(model, ro.select(slice(s, s + mb)), self.cfg.temperature)
            for s in range(0, len(ro), mb)
        ]
        return torch.cat(parts, dim=0)  # [N, C]

    def check_signal(self, frac_no_signal: float) -> None:
        """Loud, not silent: all-equal rewards in every group means every advantage is 0."""
        self.no_signal_streak = self.no_signal_streak + 1 if frac_no_signal == 1.0 else 0
        patience = self.cfg.no_signal_patience
        streak = self.no_signal_streak
        if streak == patience or (streak > 0 and streak % (5 * patience) == 0):
            msg = (
                f"WARNING: no learning signal: every group had zero reward variance for "
                f"{streak} consecutive steps (step {self.step}); all advantages "
                "are 0 and nothing is learned. Check the reward functions and the columns they "
                "get, raise temperature or num_generations, or pick easier prompts."
            )
            if dist.is_main():
                print(msg, file=sys.stderr, flush=True)
                self.log_line("warnings.log", {"step": self.step, "warning": msg})

    # ---- files -------------------------------------------------------------------------------
    def log_line(self, name: str, record: dict) -> None:
        with open(self.out / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_samples(self, batch: Batch) -> None:
        """One samples.jsonl line per prompt of `batch`: its completions, rewards, advantages."""
        G = self.cfg.num_generations
        for i, r in enumerate(batch.records):
            rows = slice(i * G, (i + 1) * G)
            sample = {"step": self.step, "prompt": r["prompt"], "answer": r["answer"]}
            sample["completions"] = batch.rollout.completions[rows]
            sample["rewards"] = batch.rewards[rows].tolist()
            sample["advantages"] = batch.advantages[rows].tolist()
            self.log_line("samples.jsonl", sample)

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N (rank 0 writes it, whole or not at all; every rank waits)."""
        path = checkpoint.step_dir(self.out, self.step)
        if dist.is_main():
            state = {"step": self.step, "no_signal_streak": self.no_signal_streak}
            lora, base = self.cfg.use_lora, base_path(self.cfg)
            checkpoint.save_checkpoint(
                path, self.model, self.opt, use_lora=lora, base=base, state=state
            )
        dist.barrier()
        return path

    def load_checkpoint(self, path: Path) -> None:
        meta = checkpoint.load_checkpoint(path, self.model, self.opt, use_lora=self.cfg.use_lora)
        self.step = int(meta["step"])
        self.no_signal_streak = int(meta.get("no_signal_streak", 0))
