"""Part 3: whole GRPO steps of the tiny default config (examples/tiny.yaml), four ways.

    NF4 base + LoRA, beta 0        the default
    NF4 base + LoRA, beta 0.04     + a reference forward (adapters disabled) for the KL term
    fp32 base + LoRA, beta 0       quantize: false
    fp32 base + LoRA, beta 0.04

Each runs in its own process (so its peak RSS is its own): build the trainer on a warmed-up tiny
base shared by all four, one untimed step, then `steps` timed `train_step()`s. A step splits into

    generation       sampling prompts_per_step x num_generations completions (KV cache)
    reference        log-probs with adapters disabled (beta > 0 only; at beta 0 what remains
                     is computing the advantages, a fraction of a millisecond)
    policy fwd/bwd   the update minus the optimizer: forward, loss, backward, gradient clipping
    optimizer        AdamW step
    other            the rest of the train_step() call: rewards, metrics, bookkeeping

Each phase's time is what the trainer reports at its "phase_end" hook (`add_callback`).

generated tokens/s = completion tokens sampled / generation seconds (the trainer's own metric);
trained tokens/s = completion tokens in the loss / (policy fwd/bwd + optimizer) seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .measure import child_main, exact, figure, peak_rss_bytes, ratio_of, run_child, torch_threads

TINY_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"
BETA_KL = 0.04  # DeepSeekMath's beta
CONFIGS = {  # name -> (quantize, beta)
    "nf4_beta0": (True, 0.0),
    "nf4_beta0.04": (True, BETA_KL),
    "fp32_beta0": (False, 0.0),
    "fp32_beta0.04": (False, BETA_KL),
}
PHASES = (
    "step_seconds",
    "generation_seconds",
    "reference_seconds",
    "policy_fwd_bwd_seconds",
    "optimizer_seconds",
    "other_seconds",
)


def config_label(name: str) -> str:
    quantize, beta = CONFIGS[name]
    return f"{'NF4' if quantize else 'fp32'} base + LoRA, beta {beta:g}"


def make_config(output_dir: str, overrides: dict):
    from grpo.cli import load_config

    cfg = load_config(TINY_CONFIG)
    for key, value in {"output_dir": str(output_dir), "device": "cpu", **overrides}.items():
        setattr(cfg, key, value)
    return cfg.validate()


def build_base(output_dir: str, overrides: dict) -> Path:
    """The warmed-up tiny Phi in <output_dir>/base, shared by every config (setup, not measured:
    one thread, the fastest for a model this small)."""
    from grpo.tasks import load_task
    from grpo.tiny.warmup import ensure_tiny_base

    cfg = make_config(output_dir, overrides)
    with torch_threads(1):
        return ensure_tiny_base(cfg, load_task(cfg), log=lambda msg: None)


def step_record(m: dict, phases: dict, step_seconds: float, completions: int, cfg) -> dict:
    """One timed step: its phases, the rest of the call, and tokens/s both ways."""
    trained_tokens = m["completion_length"] * completions * cfg.num_iterations
    fwd_bwd, opt = phases["forward_backward"], phases["optimizer"]
    return {
        "step_seconds": step_seconds,
        "other_seconds": step_seconds - sum(phases.values()),
        "generation_seconds": phases["generation"],
        "reference_seconds": phases["reference"],
        "policy_fwd_bwd_seconds": fwd_bwd,
        "optimizer_seconds": opt,
        "generated_tokens_per_second": m["generated_tokens_per_second"],
        "trained_tokens_per_second": trained_tokens / (fwd_bwd + opt),
        "completion_length": m["completion_length"],
    }


def child(args: dict) -> dict:
    """In a fresh process: time `steps` GRPO steps of one config, after `warmup_steps`."""
    from grpo.train import build_trainer

    quantize, beta = CONFIGS[args["config"]]
    # the thread count is the bench's (set by its runner), not the config's
    settings = {"quantize": quantize, "beta": beta, "torch_threads": torch.get_num_threads()}
    cfg = make_config(args["output_dir"], {**args["overrides"], **settings})
    start = time.perf_counter()
    trainer = build_trainer(cfg, log=lambda msg: None)  # reuses <output_dir>/base
    init_seconds = time.perf_counter() - start
    phases: dict[str, float] = {}

    def on_phase_end(trainer, info):
        phases[info["phase"]] = phases.get(info["phase"], 0.0) + info["seconds"]

    trainer.add_callback("step_start", lambda trainer, info: phases.clear())
    trainer.add_callback("phase_end", on_phase_end)
    completions = cfg.prompts_per_step * cfg.num_generations
    steps = []
    for i in range(args["warmup_steps"] + args["steps"]):
        start = time.perf_counter()
        m, _ = trainer.train_step()
        seconds = time.perf_counter() - start
        if i >= args["warmup_steps"]:
            steps.append(step_record(m, phases, seconds, completions, cfg))
    return {
        "steps": steps,
        "peak_rss_bytes": peak_rss_bytes(),
        "init_seconds": init_seconds,
        "completions_per_step": completions,
        "threads": torch.get_num_threads(),
    }


def config_figures(name: str, out: dict) -> dict:
    """Figures of one config from its child's steps."""
    per = {k: [s[k] for s in out["steps"]] for k in out["steps"][0]}
    of = "the whole process: interpreter, torch, model, optimizer, all steps"
    return {
        "label": config_label(name),
        **{k: figure(per[k], "s") for k in PHASES},
        "generated_tokens_per_second": figure(per["generated_tokens_per_second"], "tokens/s"),
        "trained_tokens_per_second": figure(per["trained_tokens_per_second"], "tokens/s"),
        "completion_length": figure(per["completion_length"], "tokens"),
        "peak_rss": exact(out["peak_rss_bytes"] / 2**20, "MiB", of=of),
        "trainer_init_seconds": round(out["init_seconds"], 2),
        "completions_per_step": out["completions_per_step"],
    }


def run(output_dir: str, overrides: dict, steps: int, warmup_steps: int, threads: int, log=print):
    """Every config on the base that build_base(output_dir, overrides) made."""
    results = {}
    common = dict(output_dir=str(output_dir), overrides=overrides, steps=steps, threads=threads)
    for name in CONFIGS:
        out = run_child("bench.grpo_step", {**common, "config": name, "warmup_steps": warmup_steps})
        r = results[name] = config_figures(name, out)
        phases = ", ".join(f"{k.removesuffix('_seconds')} {r[k]['median']:.3f}" for k in PHASES)
        log(f"  {r['label']}: {phases} s; peak RSS {r['peak_rss']['median']:.0f} MiB")

    def ratio(a: str, b: str, key: str = "step_seconds") -> dict:
        return ratio_of(
            results[a][key], results[b][key], f"{key} {config_label(a)}", f"{key} {config_label(b)}"
        )

    return {
        "config": f"{TINY_CONFIG.relative_to(TINY_CONFIG.parents[1])} with {overrides}",
        "steps_timed": steps,
        "steps_untimed": warmup_steps,
        "configs": results,
        "ratios": {
            "step_nf4_vs_fp32_beta0": ratio("nf4_beta0", "fp32_beta0"),
            "step_nf4_vs_fp32_beta0.04": ratio("nf4_beta0.04", "fp32_beta0.04"),
            "step_beta0.04_vs_beta0_nf4": ratio("nf4_beta0.04", "nf4_beta0"),
            "peak_rss_nf4_vs_fp32_beta0": ratio("nf4_beta0", "fp32_beta0", "peak_rss"),
        },
    }


if __name__ == "__main__":
    child_main(child)
