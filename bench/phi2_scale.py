"""The Phi-2 recipe at Phi-2's real size: real GRPO steps of the trainer on a random-weight Phi-2.

    python -m bench.phi2_scale                     # the run that fits this machine (see below)
    python -m bench.phi2_scale --steps 3 --prompts 4 --generations 2 --new-tokens 64
    make phi2-scale

The model is built from Phi-2's config with random bf16 weights (bench/phi2.py): speed and memory
do not depend on the weights' values. The run is examples/phi2_gsm8k.yaml with only the batch cut
down, prepared by the same loader (NF4 + double quant, LoRA r=16 on all six linears of each
block) and trained by the same `GRPOTrainer.train_step`. Random weights never stop on purpose,
so every completion is forced to its full length (min_new_tokens = max_new_tokens); the prompts
are GSM8K-shaped synthetic questions.

The trainer's hooks time each phase and take its peak memory (on CPU the resident set, reset at
each phase start; on CUDA the caching allocator's peak). The peak is shown beside the parts it
should be made of:

    runtime       resident set after importing torch/transformers, before the model
    model         every tensor of the prepared model but the LoRA matrices
    lora, grads   the LoRA matrices and their gradients
    optimizer     AdamW's two moments
    activations   the largest rise of memory within one phase over its start

Defaults: on a CPU 2 prompts x 2 completions x 32 new tokens, 2 steps; on a GPU the recipe's batch
(16 x 8 x 256). --layers 2 runs the same code on a 2-layer Phi-2 (the test does). The last stdout
line is one JSON object with at least `device`, `step_seconds` (median over steps) and
`peak_memory_gb`; --out writes the whole report as JSON, --readme its tables into the README.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.measure import MemoryProbe, current_rss_bytes, environment, peak_rss_bytes
from qlora.atomic import atomic_write_text

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "phi2_gsm8k.yaml"
README_START, README_END = "<!-- phi2-scale:start -->", "<!-- phi2-scale:end -->"
PHASES = ("generation", "reference", "forward_backward", "optimizer")
BATCH = ("prompts", "generations", "new_tokens", "micro_batch")
CPU_BATCH = (2, 2, 32, 4)
GB = 1e9


def synthetic_gsm8k(n: int, seed: int = 0) -> list[dict]:
    """n GSM8K-shaped rows: a multi-sentence word problem and an answer ending '#### <n>'.

    About 200 characters each: with the character tokenizer ~200 prompt tokens, near a real GSM8K
    prompt under Phi-2's BPE (~120-250).
    """
    rng = random.Random(seed)
    names = ["Ava", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo"]
    items = ["apples", "pencils", "stickers", "marbles", "books", "coins"]
    rows = []
    for _ in range(n):
        who, what = rng.choice(names), rng.choice(items)
        a, b, c = rng.randint(10, 90), rng.randint(2, 9), rng.randint(1, 30)
        question = (
            f"{who} has {a} {what}. Each day for {b} days {who} buys {c} more {what}, and then "
            f"gives half of all the {what} to a friend at the end of the week. How many {what} "
            f"does {who} have left?"
        )
        answer = (a + b * c) // 2
        rows.append({"question": question, "answer": f"{a} + {b} * {c} = ...\n#### {answer}"})
    return rows


def write_gsm8k(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_gsm8k(n)))
    return path


def recipe_config(model_dir: Path, data: Path, out_dir: Path, args: argparse.Namespace, device):
    """examples/phi2_gsm8k.yaml with the model, data and batch of this run."""
    from grpo.cli import check_run, config_from_dict

    values = yaml.safe_load(RECIPE.read_text())
    values.update(
        model=str(model_dir),
        dataset_path=str(data),
        device=device.type,
        dtype="bfloat16",
        n_eval=4,
        max_steps=args.steps,
        prompts_per_step=args.prompts,
        num_generations=args.generations,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,  # random weights: force the realistic length
        overlong_cache=min(values.get("overlong_cache", 0), args.new_tokens // 4),
        micro_batch_size=args.micro_batch,
        output_dir=str(out_dir),
        torch_threads=args.threads,
        save_every=0,
    )
    return check_run(config_from_dict(values, source=f"{RECIPE.name} + bench.phi2_scale"))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class PhaseProbe:
    """Per-phase seconds and peak memory through the trainer's hooks; `steps` holds one record
    per step: its phases and the trainer's timing metrics."""

    def __init__(self, device: torch.device):
        self.memory = MemoryProbe(device)
        self.steps: list[dict] = []

    def step_start(self, trainer, info: dict) -> None:
        self.current = {"step": info["step"], "phases": {}}
        self.start = self.memory.reset()

    def phase_end(self, trainer, info: dict) -> None:
        peak = self.memory.peak()
        self.current["phases"][info["phase"]] = {
            "seconds": info["seconds"],
            "peak_memory_gb": peak / GB,
            "rise_gb": (peak - self.start) / GB,
        }
        self.start = self.memory.reset()

    def step_end(self, trainer, metrics: dict) -> None:
        keys = [f"{p}_seconds" for p in ("step", *PHASES)] + ["completion_length"]
        keys += ["generated_tokens", "generated_tokens_per_second"]
        self.current["metrics"] = {k: metrics[k] for k in keys if k in metrics}
        self.steps.append(self.current)

    def attach(self, trainer) -> None:
        for event in ("step_start", "phase_end", "step_end"):
            trainer.add_callback(event, getattr(self, event))

    def peak_gb(self, steps: list[dict] | None = None) -> float:
        return max(v["peak_memory_gb"] for s in steps or self.steps for v in s["phases"].values())

    def medians(self, steps: list[dict]) -> dict:
        """Median step, phase and generation-speed figures over `steps`."""

        def median(key: str) -> float:
            return statistics.median(s["metrics"].get(key, 0.0) for s in steps)

        return {
            "step_seconds": median("step_seconds"),
            "phase_seconds": {p: median(f"{p}_seconds") for p in PHASES},
            "generated_tokens_per_second": median("generated_tokens_per_second"),
        }

    def log_step(self, log, prefix: str) -> None:
        m = self.steps[-1]["metrics"]
        phases = ", ".join(f"{p} {m.get(p + '_seconds', 0.0):.2f} s" for p in PHASES)
        peak = self.peak_gb(self.steps[-1:])
        log(f"{prefix}step {m['step_seconds']:.2f} s ({phases}), peak {peak:.2f} GB")


def memory_breakdown(trainer, runtime_bytes: int, probe: PhaseProbe, device) -> dict:
    """The parts the peak should be made of (module docstring), in GB."""
    from qlora.model import stored_bytes

    lora = list(trainer.params)
    moments = [v for st in trainer.opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return {
        "runtime_gb": runtime_bytes / GB if device.type == "cpu" else 0.0,
        "model_gb": (stored_bytes(trainer.model) - tensor_bytes(lora)) / GB,
        "lora_gb": tensor_bytes(lora) / GB,
        "grads_gb": tensor_bytes(lora) / GB,
        "optimizer_gb": tensor_bytes(moments) / GB,
        "activations_gb": max(v["rise_gb"] for s in probe.steps for v in s["phases"].values()),
    }


def run(args: argparse.Namespace, log=print) -> dict:
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from bench.phi2 import phi2_dir
    from grpo.train import build_trainer  # imports transformers: part of the runtime

    runtime_bytes = current_rss_bytes()
    load_before = os.getloadavg()[0]  # other jobs on the cores slow every phase
    model_dir = phi2_dir(args.layers, log=log)
    batch = {name: getattr(args, name) for name in BATCH}
    with tempfile.TemporaryDirectory(prefix="phi2-scale-") as tmp:
        data = write_gsm8k(Path(tmp) / "gsm8k.jsonl", max(64, args.prompts * (args.steps + 1)) + 4)
        cfg = recipe_config(model_dir, data, Path(tmp) / "run", args, device)
        log(
            f"phi2_scale: {args.layers}-layer Phi-2 (random bf16 weights), {device.type}, {batch}, "
            f"{args.steps} steps, {torch.get_num_threads()} threads"
        )
        t0 = time.perf_counter()
        trainer = build_trainer(cfg, log=log)
        load_seconds = time.perf_counter() - t0
        loaded_rss, load_peak = current_rss_bytes(), peak_rss_bytes()
        probe = PhaseProbe(device)
        probe.attach(trainer)
        for _ in range(args.steps):
            trainer.train_step()
            probe.log_step(log, f"phi2_scale: step {probe.steps[-1]['step']}: ")
        breakdown = memory_breakdown(trainer, runtime_bytes, probe, device)
        del trainer
    peak, parts = probe.peak_gb(), sum(breakdown.values())
    cpu = device.type == "cpu"
    return {
        "device": device.type,
        "model": f"Phi-2 config, {args.layers} layers, random bf16 weights; NF4 + LoRA r=16",
        "model_layers": args.layers,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "steps": probe.steps,
        **probe.medians(probe.steps),
        "load_seconds": load_seconds,
        "loaded_memory_gb": loaded_rss / GB if cpu else None,
        "load_peak_memory_gb": load_peak / GB if cpu else None,
        "peak_memory_gb": peak,
        "breakdown_gb": breakdown,
        "sum_of_parts_gb": parts,
        "peak_over_parts": peak / parts,
        "environment": environment(device),
        "load_average_before": load_before,
    }


def render(result: dict) -> str:
    """Markdown: the step's split and the memory breakdown."""
    b, ph, bd = result["batch"], result["phase_seconds"], result["breakdown_gb"]
    env = result["environment"]
    machine = env.get("gpu") or f"{env['cpu_model']} ({env['cpu_count']} cores)"
    load = f" (1-minute load average {result['load_average_before']:.1f} at the start)"
    lines = [
        f"`python -m bench.phi2_scale` on {machine}, {result['threads']} torch threads: "
        f"{result['model']}; {b['prompts']} prompts x {b['generations']} completions x "
        f"{b['new_tokens']} tokens, micro-batch {b['micro_batch']}; medians of "
        f"{len(result['steps'])} steps{load}.",
        "",
        "| step | generation | reference | forward-backward | optimizer | generated tokens/s |",
        "|---|---|---|---|---|---|",
        f"| {result['step_seconds']:.1f} s | {ph['generation']:.1f} s | {ph['reference']:.1f} s "
        f"| {ph['forward_backward']:.1f} s | {ph['optimizer']:.2f} s "
        f"| {result['generated_tokens_per_second']:.1f} |",
        "",
        "| peak memory | = runtime | + model | + LoRA | + grads | + AdamW | + activations "
        "| sum of parts | peak / sum |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['peak_memory_gb']:.2f} GB | {bd['runtime_gb']:.2f} | {bd['model_gb']:.2f} "
        f"| {bd['lora_gb']:.3f} | {bd['grads_gb']:.3f} | {bd['optimizer_gb']:.3f} "
        f"| {bd['activations_gb']:.2f} | {result['sum_of_parts_gb']:.2f} GB "
        f"| {result['peak_over_parts']:.2f} |",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.phi2_scale", description=__doc__.split("\n")[0]
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--layers", type=int, default=32, help="decoder layers (Phi-2: 32)")
    p.add_argument("--steps", type=int, default=2, help="GRPO steps to run and time")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step")
    p.add_argument("--generations", type=int, default=None, help="completions per prompt")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per completion (forced)")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per forward-backward")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="also write the full report here")
    p.add_argument("--readme", type=Path, default=None, help="rewrite this file's phi2-scale block")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, the batch defaulted for the device; SystemExit(one line) on a bad value."""
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "phi2_scale: --device cuda, but torch sees no CUDA device; use --device cpu"
        )
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        recipe = yaml.safe_load(RECIPE.read_text())
        keys = ("prompts_per_step", "num_generations", "max_new_tokens", "micro_batch_size")
        defaults = tuple(recipe[k] for k in keys)
    else:
        defaults = CPU_BATCH
    for name, default in zip(BATCH, defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("layers", "steps", *BATCH):
        if getattr(args, name) < 1:
            value = getattr(args, name)
            raise SystemExit(f"phi2_scale: --{name.replace('_', '-')}={value} must be >= 1")
    if args.generations < 2:
        raise SystemExit("phi2_scale: --generations must be >= 2 (a group needs two completions)")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            return 2
        raise
    result = run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(render(result), file=sys.stderr)
    if args.readme is not None:
        from bench.results import rewrite_block

        rewrite_block(args.readme, README_START, README_END, render(result))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in ("device", "step_seconds", "peak_memory_gb", "phase_seconds")}
    summary.update(
        generated_tokens_per_second=result["generated_tokens_per_second"],
        sum_of_parts_gb=result["sum_of_parts_gb"],
        layers=result["model_layers"],
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
