"""The Phi-2 recipe on a CUDA GPU: our NF4 + LoRA against bitsandbytes + peft, and memory caps.

    python -m bench.phi2_gpu --out bench/phi2_gpu.json          # on a machine with a CUDA GPU
    python -m bench.phi2_gpu --device cpu --layers 2 --prompts 2 --generations 2 --new-tokens 8

Both stacks run the same GRPO step (`GRPOTrainer.train_step`: generation, reference log-probs with
the adapters off, forward-backward with gradient checkpointing, AdamW) on the same random-weight
Phi-2 (bench/phi2.py), the same synthetic GSM8K-shaped prompts and the same batch. Only the
quantized base and the adapters differ:

    ours    qlora: NF4 + double quantization while loading, LoRA r=16 on the six linears
    peer    transformers' BitsAndBytesConfig(nf4, double quant, bf16 compute) + peft LoraConfig
            with the same rank, alpha, dropout and targets; the reference is peft's
            `disable_adapter()`

Then, for each memory cap (GB, emulated with torch.cuda.set_per_process_memory_fraction), the
largest batch of a fixed ladder that completes one step of ours under it. Results are written
to --out after every stage, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.layer_speed import bnb_nf4_config
from bench.measure import environment
from bench.phi2_scale import PHASES, PhaseProbe, recipe_config, write_gsm8k
from qlora.atomic import atomic_write_text

GB = 1e9
# (prompts, generations, micro-batch), largest first: the ladder tried under each memory cap.
LADDER = (
    (16, 8, 16),
    (16, 8, 8),
    (16, 8, 4),
    (8, 8, 8),
    (8, 8, 4),
    (4, 8, 4),
    (4, 8, 2),
    (2, 8, 2),
    (2, 4, 1),
)


def bnb_peft_policy(cfg, device: torch.device):
    """The peer's (model, tokenizer): bitsandbytes NF4 + peft LoRA, as TRL users build it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.policy import fold_output_head_input, use_fused_gelu

    model = AutoModelForCausalLM.from_pretrained(
        cfg.model,
        dtype=torch.bfloat16,
        quantization_config=bnb_nf4_config(),
        device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"},
        use_kernels=False,  # hub kernels: not ours to measure, and unreachable offline
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    fold_output_head_input(model)
    use_fused_gelu(model)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.config.use_cache = True
    return model, tokenizer


@contextlib.contextmanager
def peft_reference():
    """Within: the trainer's reference pass turns the adapters off with peft's own switch."""
    import grpo.trainer as trainer_module

    saved = trainer_module.adapters_disabled
    trainer_module.adapters_disabled = lambda model: model.disable_adapter()
    try:
        yield
    finally:
        trainer_module.adapters_disabled = saved


def build_peer(cfg, device: torch.device):
    """GRPOTrainer handed the bitsandbytes + peft model (no reference copy: peft disables)."""
    from grpo.tasks import load_task
    from grpo.trainer import GRPOTrainer

    torch.manual_seed(cfg.seed)
    model, tokenizer = bnb_peft_policy(cfg, device)
    return GRPOTrainer(cfg, model, tokenizer, load_task(cfg), None, device=device, log=_quiet)


def _quiet(msg: str) -> None:
    pass


def build_ours(cfg, device: torch.device):
    from grpo.train import build_trainer

    return build_trainer(cfg, log=_quiet)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def timed_steps(trainer, device: torch.device, steps: int, log) -> dict:
    """Run `steps` GRPO steps; medians of the steps after the first (which also warms up kernels
    and caches) and the peak memory (the allocator's peak on CUDA)."""
    probe = PhaseProbe(device)
    probe.attach(trainer)
    for _ in range(steps):
        trainer.train_step()
        probe.log_step(log, "phi2_gpu:   ")
    return {
        "steps": len(probe.steps),
        **probe.medians(probe.steps[1:] or probe.steps),
        "step_seconds_all": [s["metrics"]["step_seconds"] for s in probe.steps],
        "peak_memory_gb": probe.peak_gb(),
    }


def resize(trainer, prompts: int, generations: int, micro_batch: int) -> None:
    sizes = dict(
        prompts_per_step=prompts, num_generations=generations, micro_batch_size=micro_batch
    )
    trainer.cfg = dataclasses.replace(trainer.cfg, **sizes)


def one_step(trainer, device: torch.device, batch: tuple) -> dict | None:
    """One step of `batch` (prompts, generations, micro-batch): its peak and seconds, or None
    when it ran out of memory."""
    resize(trainer, *batch)
    free(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        t0 = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        trainer.opt.zero_grad(set_to_none=True)
        return None
    seconds = time.perf_counter() - t0
    return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / GB, "step_seconds": seconds}


def fit(batch: tuple, figures: dict, how: str) -> dict:
    prompts, generations, micro_batch = batch
    sizes = {"prompts": prompts, "generations": generations, "micro_batch": micro_batch}
    return {**sizes, **figures, "how": how}


def cap_search(trainer, device: torch.device, caps: list[float], measured: dict, log) -> list:
    """For each cap (GB, largest first): the first batch of LADDER whose step fits under it.

    A cap above the recipe batch's measured peak (`measured`, with 5% to spare) fits that batch
    without another step; below it, LADDER is walked from the last cap's fit down, one step each.
    """
    total = torch.cuda.get_device_properties(device).total_memory
    c = trainer.cfg
    recipe = (c.prompts_per_step, c.num_generations, c.micro_batch_size)
    start = LADDER.index(recipe) if recipe in LADDER else 0
    rows = []
    for cap in sorted(caps, reverse=True):
        row = {"cap_gb": cap, "fits": None, "tried": []}
        rows.append(row)
        if measured["peak_memory_gb"] * 1.05 <= cap:
            figures = {k: measured[k] for k in ("peak_memory_gb", "step_seconds")}
            row["fits"] = fit(recipe, figures, "the recipe batch's measured peak is under the cap")
            log(f"phi2_gpu: cap {cap:g} GB: recipe batch fits ({measured['peak_memory_gb']:.1f})")
            continue
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GB / total), device)
        for index in range(start, len(LADDER)):
            batch = LADDER[index]
            name = "{}x{}/{}".format(*batch)
            figures = one_step(trainer, device, batch)
            if figures is None:
                row["tried"].append(list(batch))
                log(f"phi2_gpu: cap {cap:g} GB: {name}: out of memory")
                continue
            row["fits"] = fit(batch, figures, "one step ran under the cap")
            log(f"phi2_gpu: cap {cap:g} GB: {name} fits, {figures['peak_memory_gb']:.1f} GB")
            start = index
            break
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    resize(trainer, *recipe)
    return rows


def measure_stack(name: str, build, cfg, device, steps: int, log) -> tuple:
    """(trainer, figures) of one stack: its load, then `steps` timed steps."""
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log(f"phi2_gpu: {name}: loading")
    t0 = time.perf_counter()
    trainer = build(cfg, device)
    load_seconds = time.perf_counter() - t0
    loaded = torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else 0
    log(f"phi2_gpu: {name}: loaded in {load_seconds:.1f} s, {loaded:.2f} GB")
    figures = timed_steps(trainer, device, steps, log)
    return trainer, {**figures, "load_seconds": load_seconds, "loaded_memory_gb": loaded}


def ratios(ours: dict, peer: dict) -> dict:
    """ours / bitsandbytes + peft: step time, peak memory and each phase's time."""
    phases = {
        f"{p}_time": ours["phase_seconds"][p] / peer["phase_seconds"][p]
        for p in PHASES
        if peer["phase_seconds"][p] > 0
    }
    return {
        "step_time": ours["step_seconds"] / peer["step_seconds"],
        "peak_memory": ours["peak_memory_gb"] / peer["peak_memory_gb"],
        **phases,
    }


def run(args: argparse.Namespace, log) -> dict:
    """Both stacks (and the cap search after ours, on CUDA); --out is rewritten after each stage,
    and a stack that fails is recorded while the other still runs."""
    from bench.phi2 import phi2_dir

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    batch = {k: getattr(args, k) for k in ("prompts", "generations", "new_tokens", "micro_batch")}
    result: dict = {"environment": environment(device), "layers": args.layers, "batch": batch}

    def save():
        if args.out is not None:
            atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")

    t0 = time.perf_counter()
    model_dir = phi2_dir(args.layers, log=log)
    result["build_seconds"] = time.perf_counter() - t0
    stacks = [("ours", build_ours, contextlib.nullcontext)]
    stacks.append(("bitsandbytes+peft", build_peer, peft_reference))
    with tempfile.TemporaryDirectory(prefix="phi2-gpu-") as tmp:
        data = write_gsm8k(Path(tmp) / "gsm8k.jsonl", 256)
        cfg = recipe_config(model_dir, data, Path(tmp) / "run", args, device)
        for name, build, stack in reversed(stacks) if args.peer_first else stacks:
            steps = args.ours_steps if name == "ours" and args.ours_steps else args.steps
            trainer = None
            try:
                with stack():
                    trainer, result[name] = measure_stack(name, build, cfg, device, steps, log)
                    save()
                    if name == "ours" and device.type == "cuda" and args.caps:
                        trainer.callbacks.clear()  # the probe resets the peak at each phase
                        result["caps"] = cap_search(trainer, device, args.caps, result[name], log)
            except Exception as err:  # record and go on: the other stack still runs
                result.setdefault(name, {})["error"] = f"{type(err).__name__}: {err}"[:2000]
                log(f"phi2_gpu: {name}: {type(err).__name__}: {err}")
            save()
            trainer = None
            free(device)
    ours, peer = result.get("ours", {}), result.get("bitsandbytes+peft", {})
    if "step_seconds" in ours and "step_seconds" in peer:
        result["ratios"] = ratios(ours, peer)
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.phi2_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="steps per stack (the first is warm-up)")
    p.add_argument("--ours-steps", type=int, default=0, help="steps for ours (0: --steps)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--caps", default="80,40,24,16", help="memory caps in GB ('' for none)")
    p.add_argument("--peer-first", action="store_true", help="run bitsandbytes + peft first")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "phi2_gpu: no CUDA device is visible; use --device cpu for a dry run", file=sys.stderr
        )
        return 2
    args.caps = [float(c) for c in args.caps.split(",") if c.strip()]
    result = run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({k: result[k] for k in ("ratios",) if k in result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
