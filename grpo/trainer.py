"""The GRPO loop: sample a group per prompt, score it, weigh it against its own group, update.

One step, for a generation batch of `prompts_per_step` prompts and G = `num_generations`:

    1. rollouts     G completions per prompt, sampled with the current policy   [N = prompts * G]
    2. rewards      r = sum_k w_k * reward_k(prompt, completion)                 [N]
    3. advantages   A = reward_advantages(r_k, w_k, G) (group_advantages of r)   [N]
    4. reference    logp_ref with the adapters disabled (only when beta > 0)     [N, C]
    5. old policy   logp_old before any update (only when num_iterations > 1)    [N, C]
    6. for each of num_iterations passes, for each micro-batch:
           logp = completion_logps(policy); loss = grpo_loss(...) * share; loss.backward()
       then clip the gradient norm, set the step's learning rate, optimizer step.

`make_batch` does 1-3 and returns a `Batch`; `update` does 4-6 on it. The trainer is handed what
it trains (minGPT's `Trainer(config, model, dataset)`): the policy, its tokenizer and the task,
whose reward functions score the completions. Only the LoRA matrices train in QLoRA mode (the NF4
base is frozen); with `use_lora: false` the whole (unquantized) model trains, and the reference is
a frozen copy. `grpo.train.build_trainer` prepares all of it from a config.

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
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.utils import clip_grad_norm_
from torch.optim import AdamW

from grpo import distributed as dist
from grpo.config import GRPOConfig
from grpo.logprobs import completion_logps, completion_logps_and_entropies
from grpo.loss import (
    GLOBAL_TOKEN_LOSSES,
    LOSS_VARIANT_OPTIONS,
    constant_groups,
    grpo_loss,
    reward_advantages,
)
from grpo.metrics import no_signal_warning, step_metrics
from grpo.policy import release_memory_each_step
from grpo.reward_funcs import build_rewards
from grpo.rewards import combine_rewards
from grpo.rollout import Rollout, generate_rollouts
from grpo.schedule import learning_rate
from qlora import adapters_disabled, release_freed_memory

if TYPE_CHECKING:
    from grpo.tasks import Task

EVENTS = ("step_start", "phase_end", "step_end")
SAMPLING = ("max_new_tokens", "min_new_tokens", "temperature", "top_p")  # generate_rollouts'


@dataclass
class Batch:
    """One step's rollouts on this process: N = len(records) * G rows, each group contiguous."""

    records: list[dict]  # this process's prompts, {"prompt", "answer", ...} each
    answers: list[str]  # [N] the gold answer of each row
    rollout: Rollout  # [N] completions, their masks and truncation flags
    rewards: torch.Tensor  # [N] weighted reward sum
    reward_parts: dict[str, torch.Tensor]  # reward name -> [N] its unweighted values
    step_rewards: torch.Tensor  # [N * world] every process's rewards, in rank order
    advantages: torch.Tensor  # [N] reward_advantages of every rank's rewards, this rank's rows
    no_signal: torch.Tensor  # [N * world / G] bool: constant_groups(step_rewards, G)
    generation_seconds: float = 0.0


class GRPOTrainer:
    """GRPO on `model` (the policy: NF4 base + LoRA, or a whole model) for `task`.

    `reference` is a frozen copy for the KL term when the whole model trains (None with LoRA:
    the reference is the model with its adapters disabled). `device` defaults to the model's.
    """

    def __init__(
        self,
        cfg: GRPOConfig,
        model,
        tokenizer,
        task: Task,
        reference=None,
        *,
        device: torch.device | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.log = log or (lambda msg: print(msg, flush=True))
        self.model, self.tokenizer, self.task, self.reference = model, tokenizer, task, reference
        self.device = device if device is not None else next(model.parameters()).device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.release_memory = release_memory_each_step(self.model, self.device)
        self.forward_model = dist.wrap(self.model, self.device)  # the loss's forward: DDP if > 1
        self.opt = AdamW(self.params, lr=learning_rate(cfg, 0), weight_decay=cfg.weight_decay)
        self.sampling = {k: getattr(cfg, k) for k in SAMPLING}
        names = ("loss_type", "epsilon_low", "epsilon_high", "beta", "importance_sampling_level")
        self.loss_options = {k: getattr(cfg, k) for k in (*names, *LOSS_VARIANT_OPTIONS)}
        # Token entropies only for the options that read them (otherwise never computed).
        self.with_entropy = cfg.top_entropy_quantile < 1 or cfg.entropy_coef > 0
        self.loss_options["max_completion_length"] = cfg.max_new_tokens  # used by "dr_grpo"
        self.reward_fns, self.reward_weights = build_rewards(cfg, task)  # the task's, by name
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
        if self.release_memory:
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
        ro = generate_rollouts(self.model, self.tokenizer, prompts, **self.sampling)
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
            truncated=ro.truncated.tolist(),
        )
        step_rewards = dist.all_gather_cat(rewards.float().to(self.device)).cpu()  # [N * world]
        step_parts = torch.stack(list(parts.values()), dim=1).float().to(self.device)  # [N, K]
        step_parts = dist.all_gather_cat(step_parts).cpu()  # [N * world, K]
        advantages = reward_advantages(
            step_parts, self.reward_weights, G, scale=self.cfg.scale_rewards,
            aggregation=self.cfg.multi_objective_aggregation,
        )  # fmt: skip
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
        options = {**self.loss_options, "num_items_in_batch": num_items}
        starts = range(0, N, cfg.micro_batch_size)
        self.model.train()
        for _ in range(cfg.num_iterations):
            t0 = time.perf_counter()
            for start in starts:
                rows = slice(start, min(N, start + cfg.micro_batch_size))
                part = ro.select(rows)
                # DDP all-reduces on the last micro-batch only (gradient accumulation).
                sync = self.forward_model is self.model or start == starts[-1]
                with contextlib.nullcontext() if sync else self.forward_model.no_sync():
                    if self.with_entropy:  # [n, C] each
                        logps, entropies = completion_logps_and_entropies(
                            self.forward_model, part, cfg.temperature
                        )
                    else:
                        logps = completion_logps(self.forward_model, part, cfg.temperature)
                        entropies = None
                    old = None if old_logps is None else old_logps[rows]
                    ref = None if ref_logps is None else ref_logps[rows]
                    adv, mask = batch.advantages[rows], loss_mask[rows]
                    loss, stats = grpo_loss(
                        logps, old, ref, adv, mask, entropies=entropies, **options
                    )
                    # Per-sequence and per-micro-batch means weigh in by their share of the
                    # rank's batch, so the accumulated gradient is the full-batch one; "dapo"
                    # (and "cispo", "vespo") already divide by the global token count, so they
                    # undo DDP's average.
                    global_mean = cfg.loss_type in GLOBAL_TOKEN_LOSSES
                    share = dist.world_size() if global_mean else len(part) / N
                    (loss * share).backward()
                for k, v in {**stats, "loss": loss.item()}.items():
                    stats_acc[k] += v * len(part) / (N * cfg.num_iterations)
            # The global L2 norm before clipping (max_grad_norm 0: measured, not clipped).
            grad_norm = float(clip_grad_norm_(self.params, cfg.max_grad_norm or math.inf))
            seconds["forward_backward"] += self.phase_end("forward_backward", t0)
            t0 = time.perf_counter()
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            seconds["optimizer"] += self.phase_end("optimizer", t0)
        self.step += 1
        self.check_signal(batch.no_signal.float().mean().item())
        return step_metrics(
            self.step, batch, self.task, lr, grad_norm, seconds, stats_acc, self.device
        )

    @torch.no_grad()
    def reference_logps(self, ro: Rollout) -> torch.Tensor:
        """Step 4: log-probs [N, C] under the reference (the base: adapters disabled)."""
        if self.reference is not None:
            return self.policy_logps_nograd(ro, self.reference)
        with adapters_disabled(self.model):
            return self.policy_logps_nograd(ro)

    @torch.no_grad()
    def policy_logps_nograd(self, ro: Rollout, model=None) -> torch.Tensor:
        """Step 5: log-probs [N, C] under the current policy (or `model`), in micro-batches."""
        mb, model = self.cfg.micro_batch_size, self.model if model is None else model
        parts = [
            completion_logps(model, ro.select(slice(s, s + mb)), self.cfg.temperature)
            for s in range(0, len(ro), mb)
        ]
        return torch.cat(parts, dim=0)  # [N, C]

    def check_signal(self, frac_no_signal: float) -> None:
        """Loud, not silent: all-equal rewards in every group means every advantage is 0."""
        self.no_signal_streak = self.no_signal_streak + 1 if frac_no_signal == 1.0 else 0
        msg = no_signal_warning(self.no_signal_streak, self.cfg.no_signal_patience, self.step)
        if msg and dist.is_main():
            print(msg, file=sys.stderr, flush=True)
            self.log_line("warnings.log", {"step": self.step, "warning": msg})

    # ---- files -------------------------------------------------------------------------------
    def log_line(self, name: str, record: dict) -> None:
        with open(self.out / name, "a") as f:
            f.write(json.dumps(record) + "\n")
