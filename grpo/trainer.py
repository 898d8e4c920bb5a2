"""The GRPO loop: sample a group per prompt, score it, weigh it against its own group, update.

One step, for a generation batch of `prompts_per_step` prompts and G = `num_generations`:

    1. rollouts     G completions per prompt, sampled with the current policy   [N = prompts * G]
    2. rewards      r = sum_k w_k * reward_k(prompt, completion)                 [N]
    3. advantages   A = group_advantages(r, G)                                   [N]
    4. reference    logp_ref with the adapters disabled (only when beta > 0)     [N, C]
    5. old policy   logp_old before any update (only when num_iterations > 1)    [N, C]
    6. for each of num_iterations passes, for each micro-batch:
           logp = completion_logps(policy); loss = grpo_loss(...) * share; loss.backward()
       then clip the gradient norm, optimizer step, scheduler step.

Only the LoRA matrices train in QLoRA mode (the NF4 base is frozen); with `use_lora: false` the
whole (unquantized) model trains, and the reference is a frozen copy.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from grpo import distributed as dist
from grpo.config import ConfigError, GRPOConfig
from grpo.data import Task
from grpo.loss import group_advantages, grpo_loss
from grpo.model import load_model
from grpo.rewards import build_reward_functions, combine_rewards, is_correct
from grpo.rollout import Rollout, completion_logps, generate_rollouts
from grpo.tiny import build_tiny_phi, save_model_dir
from grpo.warmup import accuracy_target, supervised_warmup
from qlora import (
    adapters_disabled,
    footprint,
    load_adapter,
    prepare_qlora,
    save_adapter,
    trainable_parameters,
)


def resolve_device(cfg: GRPOConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA device is visible; use --device cpu")
    return torch.device(cfg.device)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Model preparation
# --------------------------------------------------------------------------------------------


def ensure_tiny_base(cfg: GRPOConfig, task: Task, log=print) -> Path:
    """<output_dir>/base: the tiny Phi after the supervised warm-up (built once, then reused)."""
    base_dir = Path(cfg.output_dir) / "base"
    wanted = warmup_settings(cfg)
    if (base_dir / "config.json").is_file():
        built = _read_warmup_settings(base_dir)
        if built == wanted:
            log(f"warm-up: reusing {base_dir} (delete it to rebuild)")
            return base_dir
        changed = sorted(k for k in wanted if built.get(k) != wanted[k])
        log(
            f"warm-up: {base_dir} was built with other settings ("
            + ", ".join(f"{k}: {built.get(k)!r} -> {wanted[k]!r}" for k in changed)
            + "); rebuilding it"
        )
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_tiny_phi(seed=cfg.seed)
    log(
        f"warm-up: tiny Phi, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"up to {cfg.warmup_sft_steps} supervised steps on the train split"
        + (
            f", until {cfg.warmup_target_accuracy:.0%} of a train probe is right"
            if cfg.warmup_target_accuracy > 0
            else ""
        )
    )
    stop = None
    if cfg.warmup_target_accuracy > 0:
        stop = accuracy_target(
            tokenizer, task.train, cfg.warmup_target_accuracy, cfg.max_new_tokens, log=log
        )
    info = supervised_warmup(
        model,
        tokenizer,
        task.train,
        steps=cfg.warmup_sft_steps,
        batch_size=cfg.warmup_sft_batch_size,
        learning_rate=cfg.warmup_sft_learning_rate,
        seed=cfg.seed,
        log=log,
        callback=stop,
    )
    if stop is not None:
        info["probe_accuracy"] = stop.history
    # For reference only: the unquantized warm-up model's held-out accuracy. GRPO's "before"
    # is measured later on the NF4 base it actually starts from.
    info["accuracy_dense"], _ = evaluate(model, tokenizer, task.eval, cfg.max_new_tokens)
    log(f"warm-up: held-out greedy accuracy of the unquantized model {info['accuracy_dense']:.1%}")
    info["settings"] = wanted
    save_model_dir(model, tokenizer, base_dir)
    atomic_write_text(base_dir / "warmup.json", json.dumps(info, indent=2))
    return base_dir


def warmup_settings(cfg: GRPOConfig) -> dict:
    """Everything the cached warm-up model depends on; a base built with other values is rebuilt."""
    keys = (
        "seed",
        "task",
        "arithmetic_format",
        "n_eval",
        "warmup_sft_steps",
        "warmup_target_accuracy",
    )
    keys += ("warmup_sft_batch_size", "warmup_sft_learning_rate")
    return {k: getattr(cfg, k) for k in keys}


def _read_warmup_settings(base_dir: Path) -> dict:
    try:
        return json.loads((base_dir / "warmup.json").read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return {}


def model_path(cfg: GRPOConfig) -> str:
    return str(Path(cfg.output_dir) / "base") if cfg.model == "tiny" else cfg.model


def build_policy(cfg: GRPOConfig, device: torch.device):
    """(model, tokenizer, reference or None): the base from the one loader, then QLoRA."""
    model, tokenizer = load_model(model_path(cfg), cfg.dtype)
    model.to(device)
    reference = None
    if cfg.use_lora:
        prepare_qlora(
            model,
            target_modules=tuple(cfg.lora_targets),
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            quantize=cfg.quantize,
        )
    elif cfg.beta > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.config.use_cache = True
    return model, tokenizer, reference


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int = 256):
    """Greedy accuracy on `records` and the completions: (accuracy, [completion, ...])."""
    completions = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        ro = generate_rollouts(
            model,
            tokenizer,
            [r["prompt"] for r in chunk],
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        completions.extend(ro.completions)
    correct = [is_correct(c, r["answer"]) for c, r in zip(completions, records, strict=True)]
    return sum(correct) / max(1, len(records)), completions


# --------------------------------------------------------------------------------------------
# Optimizer, schedule, checkpoints
# --------------------------------------------------------------------------------------------


def lr_lambda(cfg: GRPOConfig):
    warm = int(cfg.warmup_ratio * cfg.max_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, cfg.max_steps - warm)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def optimizer_state_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW state as flat tensors (safetensors) + hyperparameters (JSON): nothing pickled."""
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            tensors[f"state.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig, log=None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.log = log or (lambda msg: print(msg, flush=True))
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        self.device = resolve_device(cfg)
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
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
            self.forward_model = self.ddp
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.reward_fns, self.reward_weights = build_reward_functions(
            cfg.reward_funcs,
            cfg.reward_weights,
            max_completion_length=cfg.max_new_tokens,
            cache_length=cfg.overlong_cache,
        )
        self.step = 0
        self.no_signal_streak = 0

    # ---- one GRPO step ------------------------------------------------------------------
    def sample_prompts(self, step: int) -> list[dict]:
        """This rank's prompts for `step`: a function of (seed, step) alone, so a resumed run sees
        the same. The step's prompts_per_step prompts are cut into world_size contiguous shares."""
        rng = random.Random(self.cfg.seed * 1_000_003 + step)
        records = rng.sample(self.task.train, self.cfg.prompts_per_step)
        share = self.cfg.prompts_per_step // dist.world_size()
        return records[dist.rank() * share : (dist.rank() + 1) * share]

    def make_batch(self) -> dict:
        """Steps 1-3: rollouts, rewards and advantages for this rank's prompts."""
        cfg, G = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        # Sampling seed: reproducible on resume, different on each rank.
        torch.manual_seed(cfg.seed * 1_000_003 + self.step * 1_009 + dist.rank())
        records = self.sample_prompts(self.step)
        prompts = [r["prompt"] for r in records for _ in range(G)]  # [N], groups contiguous
        answers = [r["answer"] for r in records for _ in range(G)]
        ro = generate_rollouts(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            min_new_tokens=cfg.min_new_tokens,
        )
        t_gen = time.perf_counter()
        lengths = ro.completion_mask.sum(dim=1)  # [N]
        rewards, per_fn = combine_rewards(
            self.reward_fns,
            self.reward_weights,
            prompts,
            ro.completions,
            answer=answers,
            completion_lengths=lengths.tolist(),
        )
        return {
            "records": records,
            "answers": answers,
            "rollout": ro,
            "rewards": rewards,
            "per_fn": per_fn,
            "generation_seconds": t_gen - t0,
        }

    def update(self, batch: dict) -> dict:
        """Steps 3-6 on a batch from `make_batch` (or any fixed rollouts): one optimizer step."""
        cfg, G = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        ro: Rollout = batch["rollout"]
        rewards = batch["rewards"].float()  # [N] this rank's rows
        N = len(ro)
        # Advantages over the whole step's batch (all ranks), then this rank's rows.
        all_rewards = dist.all_gather_cat(rewards.to(self.device)).cpu()  # [N * world]
        advantages = group_advantages(all_rewards, G, scale=cfg.scale_rewards)
        advantages = advantages[dist.rank() * N : (dist.rank() + 1) * N].to(self.device)  # [N]
        frac_zero_std = (all_rewards.view(-1, G).std(dim=1) == 0).float().mean().item()

        loss_mask = ro.completion_mask.clone()  # [N, C]
        if cfg.mask_truncated_completions:
            loss_mask[ro.truncated] = 0  # DAPO: a cut-off answer says nothing about its ending
        num_items = int(dist.all_reduce_sum(int(loss_mask.sum()), self.device))

        # 4. reference, 5. old log-probs (no grad, whole batch in micro-batches)
        ref_logps = self.reference_logps(ro) if cfg.beta > 0 else None
        old_logps = self.policy_logps_nograd(ro) if cfg.num_iterations > 1 else None
        t_ref = time.perf_counter()

        # 6. policy update
        mb = cfg.micro_batch_size
        starts = list(range(0, N, mb))
        stats_acc: dict[str, float] = {}
        grad_norm = 0.0
        self.model.train()
        for _ in range(cfg.num_iterations):
            for start in starts:
                rows = slice(start, min(N, start + mb))
                part = ro.select(rows)
                # DDP all-reduces on the last micro-batch only (gradient accumulation).
                sync = start == starts[-1] or self.ddp is None
                with self.ddp.no_sync() if not sync else contextlib.nullcontext():
                    logps = completion_logps(self.forward_model, part, cfg.temperature)  # [n, C]
                    loss, stats = grpo_loss(
                        logps,
                        None if old_logps is None else old_logps[rows],
                        None if ref_logps is None else ref_logps[rows],
                        advantages[rows],
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
                for k, v in stats.items():
                    stats_acc[k] = stats_acc.get(k, 0.0) + v * len(part) / (N * cfg.num_iterations)
                stats_acc["loss"] = stats_acc.get("loss", 0.0) + loss.item() * len(part) / (
                    N * cfg.num_iterations
                )
            if cfg.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
            else:
                grads = [p.grad.norm() for p in self.params if p.grad is not None]
                grad_norm = float(torch.linalg.vector_norm(torch.stack(grads)))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        self.step += 1
        t_end = time.perf_counter()

        lengths = ro.completion_mask.sum(dim=1)  # [N]
        correct = [is_correct(c, a) for c, a in zip(ro.completions, batch["answers"], strict=True)]
        W = dist.world_size()
        metrics = {
            "step": self.step,
            "reward": all_rewards.mean().item(),
            "reward_std": all_rewards.std().item(),
            "accuracy": dist.all_reduce_sum(sum(correct), self.device) / (N * W),
            "frac_reward_zero_std": frac_zero_std,
            "completion_length": dist.all_reduce_sum(lengths.sum().item(), self.device) / (N * W),
            "completion_length_max": int(lengths.max()),
            "truncated_frac": dist.all_reduce_sum(ro.truncated.sum().item(), self.device) / (N * W),
            "lr": lr,
            "grad_norm": grad_norm,
            "step_seconds": batch.get("generation_seconds", 0.0) + t_end - t0,
            "generation_seconds": batch.get("generation_seconds", 0.0),
            "reference_seconds": t_ref - t0,
            "update_seconds": t_end - t_ref,
            "generated_tokens_per_second": lengths.sum().item()
            / max(1e-9, batch.get("generation_seconds", 0.0)),
            **stats_acc,
        }
        for name, values in batch["per_fn"].items():
            metrics[f"reward/{name}"] = values.mean().item()
            metrics[f"reward/{name}_std"] = values.std().item()
        self._last = (batch["records"], ro, rewards, advantages)
        self.check_signal(frac_zero_std)
        return metrics

    def evaluate_heldout(self) -> tuple[float, list[str]]:
        """Greedy accuracy on the held-out split and every completion, each rank taking an
        interleaved share (records[rank::world_size])."""
        W, r = dist.world_size(), dist.rank()
        mine = self.task.eval[r::W]
        _, completions = evaluate(self.model, self.tokenizer, mine, self.cfg.max_new_tokens)
        shares = dist.gather_lists(completions)
        ordered = [shares[i % W][i // W] for i in range(len(self.task.eval))]
        correct = [
            is_correct(c, rec["answer"]) for c, rec in zip(ordered, self.task.eval, strict=True)
        ]
        return sum(correct) / max(1, len(ordered)), ordered

    def train_step(self) -> dict:
        """One GRPO step: make_batch (generate, score) then update (advantages, loss, step)."""
        return self.update(self.make_batch())

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
        return torch.cat(parts, dim=0)

    def check_signal(self, frac_zero_std: float) -> None:
        """Loud, not silent: all-equal rewards in every group means every advantage is 0."""
        self.no_signal_streak = self.no_signal_streak + 1 if frac_zero_std == 1.0 else 0
        if self.no_signal_streak == self.cfg.no_signal_patience or (
            self.no_signal_streak > 0
            and self.no_signal_streak % (5 * self.cfg.no_signal_patience) == 0
        ):
            msg = (
                f"WARNING: no learning signal: every group had zero reward variance for "
                f"{self.no_signal_streak} consecutive steps (step {self.step}); all advantages "
                "are 0 and nothing is learned. Check the reward functions and the columns they "
                "get, raise temperature or num_generations, or pick easier prompts."
            )
            if dist.is_main():
                print(msg, file=sys.stderr, flush=True)
                self.log_line("warnings.log", {"step": self.step, "warning": msg})

    # ---- files ------------------------------------------------------------------------------
    def log_line(self, name: str, record: dict) -> None:
        with open(self.out / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_samples(self) -> None:
        records, ro, rewards, advantages = self._last
        G = self.cfg.num_generations
        for i, r in enumerate(records):
            rows = slice(i * G, (i + 1) * G)
            self.log_line(
                "samples.jsonl",
                {
                    "step": self.step,
                    "prompt": r["prompt"],
                    "answer": r["answer"],
                    "completions": ro.completions[rows],
                    "rewards": rewards[rows].tolist(),
                    "advantages": advantages[rows].tolist(),
                },
            )

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {
            n: p.detach().cpu().contiguous()
            for n, p in self.model.named_parameters()
            if p.requires_grad
        }

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N, written by rank 0, complete in a temp dir then renamed: a kill at
        any moment leaves either no step-N or a whole one, never a half-written one."""
        final = self.out / "checkpoints" / f"step-{self.step:06d}"
        if dist.is_main():
            self._write_checkpoint()
        dist.barrier()
        return final

    def _write_checkpoint(self) -> Path:
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-step-{self.step:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if self.cfg.use_lora:
            save_adapter(self.model, tmp / "adapter", model_path(self.cfg))
        else:
            save_file(self.trainable_state(), str(tmp / "model.safetensors"))
        tensors, meta = optimizer_state_tensors(self.opt)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta |= {
            "step": self.step,
            "scheduler_last_epoch": self.sched.last_epoch,
            "no_signal_streak": self.no_signal_streak,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def latest_checkpoint(self) -> Path | None:
        root = self.out / "checkpoints"
        done = (
            sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file())
            if root.is_dir()
            else []
        )
        return done[-1] if done else None

    def load_checkpoint(self, path: Path) -> None:
        meta = json.loads((path / "trainer_state.json").read_text())
        if self.cfg.use_lora:
            load_adapter(self.model, path / "adapter")
        else:
            state = load_file(str(path / "model.safetensors"))
            missing = [n for n in self.trainable_state() if n not in state]
            if missing:
                raise RuntimeError(
                    f"checkpoint {path} lacks {missing[0]}; it was written by a "
                    "different config (use_lora?)"
                )
            self.model.load_state_dict(state, strict=False)
        tensors = load_file(str(path / "optimizer.safetensors"))
        torch.set_rng_state(tensors.pop("rng.torch"))
        load_optimizer_state(self.opt, tensors, meta)
        self.step = int(meta["step"])
        self.no_signal_streak = int(meta.get("no_signal_streak", 0))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(self.cfg), last_epoch=meta["scheduler_last_epoch"] - 1
        )
        self.sched.step()  # LambdaLR's constructor-step convention: lands on last_epoch

    def save_final_adapter(self) -> Path:
        target = self.out / ("adapter" if self.cfg.use_lora else "model")
        if not dist.is_main():
            return target
        if self.cfg.use_lora:
            save_adapter(self.model, target, model_path(self.cfg))
        else:
            save_model_dir(self.model, self.tokenizer, target)  # full fine-tuning: the model itself
        return target

    def parameter_report(self) -> dict:
        trainable, total = trainable_parameters(self.model)
        fp = footprint(self.model)
        return {"trainable_parameters": trainable, "total_parameters": total, **fp}
