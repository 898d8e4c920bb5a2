"""`python -m grpo.train --config FILE.yaml [--field value ...]`: the whole run, end to end.

check config (grpo.cli) -> (tiny: build + supervised warm-up, cached; grpo.tiny) -> load base
with the one loader -> NF4 + LoRA (build_trainer) -> greedy eval "before" -> GRPO steps ->
greedy eval "after" -> adapter, summary.json, metrics.jsonl, samples.jsonl, plots.png in
output_dir
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from grpo import checkpoint
from grpo import distributed as dist
from grpo.cli import check_run, exit_on_error, parse_cli
from grpo.config import ConfigError, GRPOConfig
from grpo.evaluate import evaluate_distributed
from grpo.policy import ModelLoadError, base_path, build_policy, resolve_device
from grpo.summary import machine, print_report, write_plots
from grpo.tasks import load_task
from grpo.tasks.gsm8k import DatasetLoadError
from grpo.trainer import GRPOTrainer
from qlora import footprint, trainable_parameters
from qlora.atomic import atomic_write_text


def write_samples(trainer, batch) -> None:
    """One samples.jsonl line per prompt of `batch`: its completions, rewards and advantages."""
    G = trainer.cfg.num_generations
    for i, r in enumerate(batch.records):
        rows = slice(i * G, (i + 1) * G)
        sample = {"step": trainer.step, "prompt": r["prompt"], "answer": r["answer"]}
        sample["completions"] = batch.rollout.completions[rows]
        sample["rewards"] = batch.rewards[rows].tolist()
        sample["advantages"] = batch.advantages[rows].tolist()
        trainer.log_line("samples.jsonl", sample)


def build_trainer(cfg: GRPOConfig, log=None):
    """The trainer of a run of `cfg`, with everything it is handed: the process group and device,
    the task, the tiny default's warm-up base (built once, cached), and the policy."""
    log = log or (lambda msg: print(msg, flush=True))
    device = dist.setup(resolve_device(cfg.device), cfg.prompts_per_step)
    dist.set_torch_threads(device, cfg.torch_threads)  # on CPU, never over the cores
    task = load_task(cfg)
    if cfg.model == "tiny":
        from grpo.tiny.warmup import ensure_tiny_base

        if dist.is_main():  # one rank builds the cached base, the others wait and load it
            ensure_tiny_base(cfg, task, log=log)
        dist.barrier()
    torch.manual_seed(cfg.seed)  # LoRA init: identical on every rank
    model, tokenizer, reference = build_policy(cfg, device)
    return GRPOTrainer(cfg, model, tokenizer, task, reference, device=device, log=log)


LOGS = ("metrics.jsonl", "samples.jsonl", "eval.jsonl", "warnings.log")


def truncate_logs(out: Path, step: int) -> None:
    """Keep only the log lines of steps <= `step`: a run killed after logging step k but before
    its checkpoint of step k would otherwise log k twice when it resumes from an earlier one. A
    line torn by the kill is dropped too."""

    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    for name in LOGS:
        path = out / name
        if path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if kept(ln)]
            atomic_write_text(path, "".join(ln + "\n" for ln in lines))


def describe_model(trainer, say) -> dict:
    """Parameter counts and stored size of the trainer's model, printed once and returned."""
    trainable, total = trainable_parameters(trainer.model)
    report = {"trainable_parameters": trainable, "total_parameters": total}
    report |= footprint(trainer.model)
    say(
        f"model: {trainer.model.config.model_type}, {report['total_parameters']:,} parameters, "
        f"{report['trainable_parameters']:,} trainable; stored {report['bytes'] / 2**20:.2f} MiB "
        f"({report['bits_per_param']:.2f} bits/param overall); {dist.world_size()} process(es) x "
        f"{torch.get_num_threads()} torch thread(s)",
        flush=True,
    )
    return report


def resume_or_start(trainer, out: Path, resume: bool, say) -> str | None:
    """Continue from the newest complete checkpoint (with `resume`; its path is returned), or
    start fresh logs."""
    if resume and (ckpt := checkpoint.latest_checkpoint(out)) is not None:
        checkpoint.resume_trainer(trainer, ckpt)  # every rank loads the same checkpoint
        if dist.is_main():
            truncate_logs(out, trainer.step)
        say(f"resumed from {ckpt} at step {trainer.step}", flush=True)
        return str(ckpt)
    if dist.is_main():
        for name in LOGS:
            (out / name).unlink(missing_ok=True)
    return None


def heldout_evaluator(trainer, max_new_tokens: int):
    """() -> (accuracy, completions) of the trainer's model on its task's held-out split."""

    def evaluate_heldout() -> tuple[float, list[str]]:
        model, tokenizer, records = trainer.model, trainer.tokenizer, trainer.task.eval
        return evaluate_distributed(model, tokenizer, trainer.task, records, max_new_tokens)

    return evaluate_heldout


def accuracy_before(out: Path, resumed: bool, evaluate_heldout) -> dict:
    """The held-out accuracy of the base GRPO starts from: measured once, kept in
    eval_before.json for a resumed run."""
    before_path = out / "eval_before.json"
    if resumed and before_path.is_file():
        return json.loads(before_path.read_text())
    acc, comps = evaluate_heldout()
    before = {"accuracy": acc, "completions": comps}
    if dist.is_main():
        atomic_write_text(before_path, json.dumps(before))
    return before


def grpo_loop(trainer, evaluate_heldout) -> None:
    """GRPO steps up to max_steps, with their logs, samples, evaluations and checkpoints."""
    cfg, main = trainer.cfg, dist.is_main()
    bar = tqdm(
        total=cfg.max_steps,
        initial=trainer.step,
        desc="GRPO",
        dynamic_ncols=True,
        disable=None if main else True,
    )
    while trainer.step < cfg.max_steps:
        metrics, batch = trainer.train_step()
        if main:
            trainer.log_line("metrics.jsonl", metrics)
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.max_steps:
            bar.set_postfix(
                reward=f"{metrics['reward']:.3f}",
                acc=f"{metrics['accuracy']:.2f}",
                kl=f"{metrics.get('kl', 0.0):.4f}",
                refresh=False,
            )
        if main and trainer.step % cfg.sample_every == 0:
            write_samples(trainer, batch)
        if cfg.eval_every and trainer.step % cfg.eval_every == 0:
            acc, _ = evaluate_heldout()
            if main:
                trainer.log_line("eval.jsonl", {"step": trainer.step, "accuracy": acc})
                bar.write(f"step {trainer.step}: held-out greedy accuracy {acc:.1%}")
        if cfg.save_every and trainer.step % cfg.save_every == 0:
            checkpoint.save_trainer(trainer)
    bar.close()
    # Every rank reads the directory before rank 0 may write to it: the same answer on all ranks,
    # so all of them, or none, enter save_trainer's barrier.
    dist.barrier()
    latest = checkpoint.latest_checkpoint(trainer.out)
    dist.barrier()
    if latest is None or latest.name != f"step-{trainer.step:06d}":
        checkpoint.save_trainer(trainer)


def run(cfg: GRPOConfig) -> dict:
    """The whole run; under torchrun every rank calls it, rank 0 alone writes and prints."""
    t_start = time.time()
    out = Path(cfg.output_dir)
    trainer = build_trainer(cfg)  # loads the model first: a missing model leaves nothing written
    main = dist.is_main()
    say = print if main else (lambda *a, **k: None)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(out / "config.yaml")
    report = describe_model(trainer, say)
    resumed_from = resume_or_start(trainer, out, cfg.resume, say)
    evaluate_heldout = heldout_evaluator(trainer, cfg.max_new_tokens)
    before = accuracy_before(out, resumed_from is not None, evaluate_heldout)
    n_eval = len(trainer.task.eval)
    say(f"held-out greedy accuracy before GRPO: {before['accuracy']:.1%} (n={n_eval})", flush=True)

    t_grpo = time.time()
    grpo_loop(trainer, evaluate_heldout)
    grpo_seconds = time.time() - t_grpo

    acc_after, comps_after = evaluate_heldout()
    if main:  # the tuned side of the before/after comparison, as eval_before.json holds the base
        after = {"accuracy": acc_after, "completions": comps_after}
        atomic_write_text(out / "eval_after.json", json.dumps(after))
    adapter_dir = out / ("adapter" if cfg.use_lora else "model")
    if main:
        checkpoint.save_final(
            out, trainer.model, trainer.tokenizer, use_lora=cfg.use_lora, base=base_path(cfg)
        )
    summary = {
        "model": cfg.model,
        "task": cfg.task,
        "quantize": cfg.quantize,
        "use_lora": cfg.use_lora,
        "accuracy_before": before["accuracy"],
        "accuracy_after": acc_after,
        "n_eval": n_eval,
        "grpo_steps": trainer.step,
        "grpo_seconds": round(grpo_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "resumed_from": resumed_from,
        "adapter_dir": str(adapter_dir),
        "world_size": dist.world_size(),
        "torch_threads": torch.get_num_threads(),
        "machine": machine(torch.get_num_threads()),
        **report,
    }
    warmup_json = Path(base_path(cfg)) / "warmup.json"
    if warmup_json.is_file():  # the tiny default: the warm-up model's unquantized accuracy
        summary["accuracy_dense_base"] = json.loads(warmup_json.read_text()).get("accuracy_dense")
    if main:
        write_plots(out / "metrics.jsonl", out / "plots.png")
        print_report(trainer.task.eval, before, acc_after, comps_after)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        print(
            f"\nwrote {out / 'summary.json'}, {adapter_dir}, metrics.jsonl, plots.png", flush=True
        )
    dist.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = check_run(parse_cli(argv))
    except ConfigError as err:
        exit_on_error(err)
    try:
        run(cfg)
    except (ModelLoadError, DatasetLoadError, ConfigError, FileNotFoundError) as err:
        exit_on_error(err)
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
