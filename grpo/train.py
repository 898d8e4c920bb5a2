"""`python -m grpo.train --config FILE.yaml [--key value ...]`: the whole run, end to end.

validate config -> (tiny: build + supervised warm-up, cached) -> load base with the one loader
-> NF4 + LoRA -> greedy eval "before" -> GRPO steps -> greedy eval "after" -> adapter,
summary.json, metrics.jsonl, samples.jsonl, plots.png in output_dir
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from grpo.atomic import atomic_path, atomic_write_text
from grpo.config import ConfigError, GRPOConfig, exit_on_error, parse_cli
from grpo.data import DatasetLoadError
from grpo.model import ModelLoadError
from grpo.results import machine

PLOTTED = [
    ("reward", "reward (mean)"),
    ("accuracy", "sampled accuracy"),
    ("kl", "KL (k3)"),
    ("completion_length", "completion length (tokens)"),
]


def held_out_points(run_dir: Path) -> list[dict]:
    """The held-out greedy accuracies of a run: eval.jsonl, with the base GRPO started from
    (eval_before.json) as step 0 when there is at least one later point."""
    eval_path = run_dir / "eval.jsonl"
    evals = (
        [json.loads(x) for x in eval_path.read_text().splitlines() if x.strip()]
        if eval_path.is_file()
        else []
    )
    before_path = run_dir / "eval_before.json"
    if evals and before_path.is_file():
        evals.insert(0, {"step": 0, "accuracy": json.loads(before_path.read_text())["accuracy"]})
    return evals


def write_plots(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    evals = held_out_points(metrics_path.parent)
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.2))
    for ax, (key, title) in zip(axes, PLOTTED, strict=True):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=1, label="sampled (per step)")
        elif key == "kl":
            ax.text(
                0.5,
                0.5,
                "beta = 0: no reference,\nKL not computed",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        if key == "accuracy" and evals:
            ax.plot(
                [e["step"] for e in evals],
                [e["accuracy"] for e in evals],
                "o-",
                color="C3",
                label="held-out greedy",
            )
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


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


def run(cfg: GRPOConfig) -> dict:
    """The whole run; under torchrun every rank calls it, rank 0 alone writes and prints."""
    import torch
    from tqdm import tqdm

    from grpo import checkpoint
    from grpo import distributed as dist
    from grpo.evaluate import evaluate_distributed
    from grpo.model import base_path
    from grpo.trainer import GRPOTrainer
    from qlora import footprint, trainable_parameters

    t_start = time.time()
    out = Path(cfg.output_dir)
    trainer = GRPOTrainer(cfg)  # loads the model first: a missing model leaves nothing written
    main = dist.is_main()
    say = print if main else (lambda *a, **k: None)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(out / "config.yaml")
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

    resumed_from = None
    if cfg.resume and (ckpt := checkpoint.latest_checkpoint(out)) is not None:
        checkpoint.resume_trainer(trainer, ckpt)  # every rank loads the same checkpoint
        resumed_from = str(ckpt)
        if main:
            truncate_logs(out, trainer.step)
        say(f"resumed from {ckpt} at step {trainer.step}", flush=True)
    elif main:
        for name in LOGS:
            (out / name).unlink(missing_ok=True)

    def evaluate_heldout() -> tuple[float, list[str]]:
        model, tokenizer, records = trainer.model, trainer.tokenizer, trainer.task.eval
        return evaluate_distributed(model, tokenizer, trainer.task, records, cfg.max_new_tokens)

    before_path = out / "eval_before.json"
    if resumed_from and before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        acc, comps = evaluate_heldout()
        before = {"accuracy": acc, "completions": comps}
        if main:
            atomic_write_text(before_path, json.dumps(before))
    say(
        f"held-out greedy accuracy before GRPO: {before['accuracy']:.1%} "
        f"(n={len(trainer.task.eval)})",
        flush=True,
    )

    t_grpo = time.time()
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
    grpo_seconds = time.time() - t_grpo
    latest = checkpoint.latest_checkpoint(out)
    if latest is None or latest.name != f"step-{trainer.step:06d}":
        checkpoint.save_trainer(trainer)

    acc_after, comps_after = evaluate_heldout()
    adapter_dir = out / ("adapter" if cfg.use_lora else "model")
    if main:
        base = base_path(cfg)
        checkpoint.save_final(
            out, trainer.model, trainer.tokenizer, use_lora=cfg.use_lora, base=base
        )
    summary = {
        "model": cfg.model,
        "task": cfg.task,
        "quantize": cfg.quantize,
        "use_lora": cfg.use_lora,
        "accuracy_before": before["accuracy"],
        "accuracy_after": acc_after,
        "n_eval": len(trainer.task.eval),
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


def print_report(records, before: dict, acc_after: float, comps_after: list[str]) -> None:
    n = len(records)
    print("\n              held-out greedy accuracy")
    print(f"  before GRPO  {before['accuracy']:7.1%}")
    print(
        f"  after GRPO   {acc_after:7.1%}   "
        f"({(acc_after - before['accuracy']) * 100:+.1f} points, n={n})"
    )
    print("\n  prompt              base -> tuned        (gold)")
    shown = 0
    for rec, b, a in zip(records, before["completions"], comps_after, strict=True):
        if b.strip() != a.strip() and shown < 6:
            print(
                f"  {rec['prompt'][-16:]!r:<18}{b.strip()[-8:]!r:>8} -> {a.strip()[-8:]!r:<10}"
                f"({rec['answer']})"
            )
            shown += 1


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_cli(argv).validate()
    except ConfigError as err:
        exit_on_error(err)
    from grpo import distributed as dist

    try:
        run(cfg)
    except (ModelLoadError, DatasetLoadError, ConfigError, FileNotFoundError) as err:
        exit_on_error(err)
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
