"""The Phi-2 recipe at Phi-2's real size: real GRPO steps of the trainer on a random-weight Phi-2.

    python -m bench.phi2_scale                     # the run that fits this machine (see below)
    python -m bench.phi2_scale --steps 3 --prompts 4 --generations 2 --new-tokens 64
    make phi2-scale

Speed and memory do not depend on the weights' values, so a model built from Phi-2's config
with random bf16 weights (bench/phi2.py, cached on disk) runs the code a real Phi-2 would. The
run is examples/phi2_gsm8k.yaml with only the batch cut down, prepared by the same loader (NF4 +
double quant, LoRA r=16 on all six linears of each block) and trained by the same
`GRPOTrainer.train_step`: generation, reference log-probs (beta > 0), forward-backward,
optimizer. Random weights never emit EOS on purpose, so every completion is forced to its full
length (min_new_tokens = max_new_tokens) and the prompts are GSM8K-shaped synthetic questions.

The trainer's hook interface times each phase; on CPU the peak resident set (VmHWM) is taken per
phase (reset through /proc/self/clear_refs at each phase start), on CUDA the caching allocator's
peak. The memory breakdown puts the peak next to the parts it should be made of:

    runtime       resident set after importing torch/transformers, before the model
    model         every tensor of the prepared model but the LoRA matrices (NF4 codes, scales,
                  embeddings, lm_head, norms: what the model stores)
    lora, grads   the LoRA matrices and their gradients
    optimizer     AdamW's two moments
    activations   the largest rise of the resident set within one phase over its start (the
                  transient of forward-backward, or of generation's KV cache)

Defaults: on a CPU, 2 prompts x 2 completions x 32 new tokens, 2 steps (the whole step at full
size in ~2 minutes); on a GPU, the recipe's batch (16 x 8 x 256). --layers 2 runs the same code
on a 2-layer Phi-2 (the test does). The last stdout line is one JSON object with at least
`device`, `step_seconds` (median over steps) and `peak_memory_gb`; --out also writes the whole
report as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.measure import current_rss_bytes, environment, peak_rss_bytes

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "phi2_gsm8k.yaml"
README_START, README_END = "<!-- phi2-scale:start -->", "<!-- phi2-scale:end -->"
PHASES = ("generation", "reference", "forward_backward", "optimizer")
GB = 1e9

# (prompts, generations, new tokens, micro-batch) per device when not given
CPU_BATCH = (2, 2, 32, 4)


def synthetic_gsm8k(n: int, seed: int = 0) -> list[dict]:
    """n GSM8K-shaped rows: a multi-sentence word problem and an answer ending '#### <n>'.

    About 200 characters each; with the random model's character tokenizer that is ~200 prompt
    tokens after the recipe's instruction, near a real GSM8K prompt under Phi-2's BPE (~120-250).
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
    """Per-phase seconds and peak memory through the trainer's hooks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: list[dict] = []
        self.current: dict = {}

    def _reset(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return current_rss_bytes()

    def _peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()

    def step_start(self, trainer, info: dict) -> None:
        self.current = {"step": info["step"], "phases": {}}
        self.start = self._reset()

    def phase_end(self, trainer, info: dict) -> None:
        peak = self._peak()
        self.current["phases"][info["phase"]] = {
            "seconds": info["seconds"],
            "peak_memory_gb": peak / GB,
            "rise_gb": (peak - self.start) / GB,
        }
        self.start = self._reset()

    def step_end(self, trainer, metrics: dict) -> None:
        self.current["metrics"] = {
            k: metrics[k]
            for k in (
                "step_seconds",
                "generation_seconds",
                "reference_seconds",
                "forward_backward_seconds",
                "optimizer_seconds",
                "generated_tokens",
                "generated_tokens_per_second",
                "completion_length",
            )
            if k in metrics
        }
        self.steps.append(self.current)


def run(args: argparse.Namespace, log=print) -> dict:
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from bench.phi2 import phi2_dir
    from grpo.train import build_trainer  # imports transformers: part of the runtime

    runtime_bytes = current_rss_bytes()
    load_before = os.getloadavg()[0]  # other jobs on the cores slow every phase

    model_dir = phi2_dir(args.layers, log=log)
    with tempfile.TemporaryDirectory(prefix="phi2-scale-") as tmp:
        data = Path(tmp) / "gsm8k.jsonl"
        rows = synthetic_gsm8k(max(64, args.prompts * (args.steps + 1)) + 4)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = recipe_config(model_dir, data, Path(tmp) / "run", args, device)
        log(
            f"phi2_scale: {args.layers}-layer Phi-2 (random bf16 weights), {device.type}, "
            f"{args.prompts} prompts x {args.generations} completions x {args.new_tokens} tokens, "
            f"micro-batch {args.micro_batch}, {args.steps} steps, {torch.get_num_threads()} threads"
        )
        t0 = time.perf_counter()
        trainer = build_trainer(cfg, log=log)
        load_seconds = time.perf_counter() - t0
        loaded_rss = current_rss_bytes()
        probe = PhaseProbe(device)
        trainer.add_callback("step_start", probe.step_start)
        trainer.add_callback("phase_end", probe.phase_end)
        trainer.add_callback("step_end", probe.step_end)
        peak_before_steps = peak_rss_bytes() if device.type == "cpu" else 0
        for _ in range(args.steps):
            trainer.train_step()
            m = probe.steps[-1]["metrics"]
            log(
                f"phi2_scale: step {probe.steps[-1]['step']}: {m['step_seconds']:.1f} s "
                + ", ".join(f"{p} {m.get(p + '_seconds', 0.0):.1f} s" for p in PHASES)
                + f"; {m.get('generated_tokens_per_second', 0.0):.1f} generated tokens/s; peak "
                + f"{max(v['peak_memory_gb'] for v in probe.steps[-1]['phases'].values()):.2f} GB"
            )
        from qlora.model import stored_bytes

        lora = list(trainer.params)
        opt_tensors = [
            v for state in trainer.opt.state.values() for v in state.values() if torch.is_tensor(v)
        ]
        breakdown = {
            "runtime_gb": runtime_bytes / GB if device.type == "cpu" else 0.0,
            "model_gb": (stored_bytes(trainer.model) - tensor_bytes(lora)) / GB,
            "lora_gb": tensor_bytes(lora) / GB,
            "grads_gb": tensor_bytes(lora) / GB,
            "optimizer_gb": tensor_bytes(opt_tensors) / GB,
            "activations_gb": max(v["rise_gb"] for s in probe.steps for v in s["phases"].values()),
        }
        del trainer
    peak = max(v["peak_memory_gb"] for s in probe.steps for v in s["phases"].values())
    parts = sum(breakdown.values())
    step_seconds = statistics.median(s["metrics"]["step_seconds"] for s in probe.steps)
    return {
        "device": device.type,
        "model": f"Phi-2 config, {args.layers} layers, random bf16 weights; NF4 + LoRA r=16",
        "batch": {
            "prompts": args.prompts,
            "generations": args.generations,
            "new_tokens": args.new_tokens,
            "micro_batch": args.micro_batch,
        },
        "threads": torch.get_num_threads(),
        "steps": probe.steps,
        "step_seconds": step_seconds,
        "phase_seconds": {
            p: statistics.median(s["metrics"].get(p + "_seconds", 0.0) for s in probe.steps)
            for p in PHASES
        },
        "generated_tokens_per_second": statistics.median(
            s["metrics"].get("generated_tokens_per_second", 0.0) for s in probe.steps
        ),
        "load_seconds": load_seconds,
        "loaded_memory_gb": loaded_rss / GB if device.type == "cpu" else None,
        "load_peak_memory_gb": peak_before_steps / GB if device.type == "cpu" else None,
        "peak_memory_gb": peak,
        "breakdown_gb": breakdown,
        "sum_of_parts_gb": parts,
        "peak_over_parts": peak / parts if parts else math.nan,
        "environment": environment(device),
        "model_layers": args.layers,
        "load_average_before": load_before,
    }


def render(result: dict) -> str:
    """Markdown: the step's split and the memory breakdown."""
    b, ph = result["batch"], result["phase_seconds"]
    bd = result["breakdown_gb"]
    env = result["environment"]
    machine = env.get("gpu") or f"{env['cpu_model']} ({env['cpu_count']} cores)"
    lines = [
        f"`python -m bench.phi2_scale` on {machine}, {result['threads']} torch threads: "
        f"{result['model']}; {b['prompts']} prompts x {b['generations']} completions x "
        f"{b['new_tokens']} tokens, micro-batch {b['micro_batch']}; medians of "
        f"{len(result['steps'])} steps"
        + (
            f" (1-minute load average {result['load_average_before']:.1f} at the start)."
            if "load_average_before" in result
            else "."
        ),
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
    p.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="rewrite this file's block between <!-- phi2-scale:start --> and :end with the tables",
    )
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        help="do not run: render a report written by --out (with --readme, publish it)",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "phi2_scale: --device cuda, but torch sees no CUDA device; use --device cpu"
        )
    if gpu:
        recipe = yaml.safe_load(RECIPE.read_text())
        defaults = (
            recipe["prompts_per_step"],
            recipe["num_generations"],
            recipe["max_new_tokens"],
            recipe["micro_batch_size"],
        )
    else:
        defaults = CPU_BATCH
    for name, default in zip(
        ("prompts", "generations", "new_tokens", "micro_batch"), defaults, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("layers", "steps", "prompts", "generations", "new_tokens", "micro_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(
                f"phi2_scale: --{name.replace('_', '-')}={getattr(args, name)} must be >= 1"
            )
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
    if args.render is not None:
        result = json.loads(args.render.read_text())
    else:
        result = run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(render(result), file=sys.stderr)
    if args.readme is not None:
        from bench.results import rewrite_block

        rewrite_block(args.readme, README_START, README_END, render(result))
    if args.out is not None and args.render is None:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)
    summary = {k: result[k] for k in ("device", "step_seconds", "peak_memory_gb")}
    summary.update(
        phase_seconds=result["phase_seconds"],
        generated_tokens_per_second=result["generated_tokens_per_second"],
        sum_of_parts_gb=result["sum_of_parts_gb"],
        layers=result["model_layers"] if "model_layers" in result else args.layers,
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
