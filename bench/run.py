"""`make bench`: speed, memory and footprint against the peers, as ratios, in one run.

    python -m bench.run                 every part (about 10 min on 2 CPU cores), then
                                        bench/results.json, bench/results.md, the README blocks
    python -m bench.run --parts serve   one part (or a comma-separated list): its figures replace
                                        that part's in results.json (same machine), and the
                                        README blocks that show it are rewritten
    python -m bench.run --quick         small shapes, a smoke test, never published
    python -m bench.run --readme-only   rewrite results.md and the README from results.json

Parts: (1) layer_speed.py: NF4Linear+LoRA vs bitsandbytes Linear4bit+LoRA vs fp32 Linear+LoRA, and
dequantization; (2) quality.py: quantization error, bits/parameter, Phi-2's NF4 footprint;
(3) grpo_step.py: GRPO steps of the tiny default config; (4) logprob_memory.py:
selective_log_softmax vs log_softmax().gather(); (5) kernel_speed.py: the NF4 CPU kernel at Phi-2's
shapes against bitsandbytes' and our pure-PyTorch path, with the machine's read bandwidth and
matmul peak; (6) serve.py: a Phi-2-sized model served on CPU, ours vs bitsandbytes (+ peft) vs
dense bf16, and the demo server itself. Parts 3, 4 and 6 run each configuration in a child
process so that each has its own peak memory. Parts 5 and 6 share one machine probe.

Threads: parts 1-4 run on 1 thread unless --threads says otherwise. On the 2-core machine this
was tuned on, shared with other jobs, 2 torch threads made the Phi-2-shaped layer steps ~1.3x
slower than 1 thread and GRPO steps of the tiny model (many small ops) erratic (one config's
median step 13.7 s instead of 0.46 s). One thread gives stable medians, and the published figures
are ratios; on a dedicated machine pass --threads $(nproc). Parts 5 and 6 measure serving, so
they run on the demo's thread count (--serve-threads, default torch's own: the physical cores).
Repeats are in the Settings below and in results.json; parts 5 and 6 take the fewest (5), because
each Phi-2-sized configuration loads a 2.8 B-parameter model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.qlora_timing import PHI2_SHAPES
from qlora import kernel as qlora_kernel

from . import grpo_step, kernel_speed, layer_speed, logprob_memory, quality, serve
from .measure import MIN_REPEATS, REPO_ROOT, environment
from .report import ReadmeError, check_readme, render_markdown, update_readme

PARTS = ("layers", "quality", "grpo_step", "logprob_memory", "kernel", "serve")


@dataclass(frozen=True)
class Settings:
    repeats: int = 7  # repeats of every measured figure (>= MIN_REPEATS) ...
    layer_repeats: int = 15  # ... but part 1, whose ratios have targets, gets more
    grpo_steps: int = 10  # ... and part 3 times this many steps per config
    layer_shapes: tuple = PHI2_SHAPES  # (in, out): Phi-2's attention, fc1, fc2
    layer_tokens: int = 512
    lora_r: int = 16
    quality_shape: tuple = (2560, 2560)  # one Phi-2 attention matrix of N(0, 1) values
    quality_seeds: int = 5
    # GRPO part: examples/tiny.yaml plus these. A short warm-up: the bench measures speed, and a
    # 50-step base already answers with a few digits and EOS, like the real one.
    grpo_overrides: dict = field(default_factory=lambda: {"warmup_sft_steps": 50})
    grpo_untimed_steps: int = 1
    logprob_shape: tuple = (8, 256, 51200)  # batch, tokens, Phi-2's vocabulary
    # kernel part: repeats of every kernel figure (Phi-2's three shapes, 1 and 2 rows, prefill,
    # the fused/GEMM switch) and of the machine probes the serving part shares
    kernel_repeats: int = MIN_REPEATS
    # serving part: `serve_calls` generations of `serve_steps` tokens per configuration (each
    # call's first step is a prefill sample, the rest decode samples), a GSM8K-sized prompt
    serve_calls: int = MIN_REPEATS
    serve_steps: int = 8
    serve_prompt_tokens: int = 150
    serve_layers: int = 32  # Phi-2's depth


FULL = Settings()
QUICK = Settings(
    repeats=MIN_REPEATS,
    layer_repeats=MIN_REPEATS,
    grpo_steps=MIN_REPEATS,
    layer_shapes=((256, 256), (256, 1024), (1024, 256)),
    layer_tokens=64,
    quality_shape=(256, 256),
    grpo_overrides={
        "warmup_sft_steps": 5,
        "warmup_sft_batch_size": 16,
        "n_eval": 16,
        "prompts_per_step": 4,
        "num_generations": 4,
        "micro_batch_size": 8,
        "max_new_tokens": 4,
    },
    # peak RSS only sees allocations large enough to be mmap'd: keep Phi-2's vocabulary
    logprob_shape=(1, 256, 51200),
    serve_steps=6,
    serve_prompt_tokens=32,
    serve_layers=2,  # Phi-2's shapes, 2 blocks: the same code, a 0.35 GB model
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument(
        "--out-dir", type=Path, default=REPO_ROOT / "bench", help="where results.{json,md} go"
    )
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    parser.add_argument("--no-readme", action="store_true", help="leave the README alone")
    parser.add_argument(
        "--readme-only",
        action="store_true",
        help="measure nothing: regenerate results.md and the README section from results.json",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads, for this process and every child (default 1: see below)",
    )
    parser.add_argument(
        "--serve-threads",
        type=int,
        default=0,
        help="torch threads of the kernel and serving parts (default 0: torch's default, as "
        "the demo uses for a large model)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    return parser


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def merge_into(previous: dict | None, results: dict, parts: list[str]) -> dict:
    """`results` of a run of some parts, completed by the other parts of `previous` (the last
    results.json) when that was a full-sized run on the same machine: each part keeps the
    command and date it was measured with, in "measured"."""
    stamp = {"command": results["command"], "date_utc": results["environment"]["date_utc"]}
    results["measured"] = {part: stamp for part in parts}
    same_machine = previous is not None and all(
        previous.get("environment", {}).get(k) == results["environment"].get(k)
        for k in ("cpu_model", "cpu_count", "gpu")
    )
    if not same_machine or previous.get("quick") or results["quick"]:
        return results
    prior_stamp = {"command": previous["command"], "date_utc": previous["environment"]["date_utc"]}
    kept = [p for p in PARTS if p in previous and p not in parts]
    for part in kept:
        results[part] = previous[part]
        results["measured"][part] = previous.get("measured", {}).get(part, prior_stamp)
        if part in previous.get("wall_seconds", {}):
            results["wall_seconds"].setdefault(part, previous["wall_seconds"][part])
    if "machine" not in results and "machine" in previous:
        results["machine"] = previous["machine"]
    results["partial"] = not all(p in results for p in PARTS)
    return results


def load_tiny_model(base_dir: Path):
    from grpo.policy import load_model

    model, _ = load_model(base_dir, "float32")
    return model


def measure(
    settings: Settings,
    parts: list[str],
    threads: int,
    device,
    log=print,
    serve_threads: int | None = None,
) -> dict:
    """Run the chosen parts; {part: results} plus "wall_seconds" (and "machine", the probes the
    kernel and serving parts share, when either runs)."""
    results: dict = {}
    wall: dict[str, float] = {}
    n = settings.repeats
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as workdir:
        if "quality" in parts or "grpo_step" in parts:
            log("setup: warmed-up tiny Phi base (shared by parts 2 and 3)")
            start = time.perf_counter()
            base = grpo_step.build_base(workdir, settings.grpo_overrides)
            wall["setup_tiny_base"] = time.perf_counter() - start
        if "layers" in parts:
            log(
                "1/6 NF4 layer forward+backward vs bitsandbytes vs fp32, and dequantize "
                f"({settings.layer_repeats} repeats)"
            )
            start = time.perf_counter()
            results["layers"] = layer_speed.run(
                settings.layer_shapes,
                settings.layer_tokens,
                settings.lora_r,
                settings.layer_repeats,
                device,
                log,
            )
            wall["layers"] = time.perf_counter() - start
        if "quality" in parts:
            log(
                "2/6 quantization error, bits/param, Phi-2 footprint "
                f"({settings.quality_seeds} seeds)"
            )
            start = time.perf_counter()
            results["quality"] = quality.run(
                settings.quality_shape,
                settings.quality_seeds,
                load_tiny_model(base),
                settings.layer_shapes,
                log,
            )
            wall["quality"] = time.perf_counter() - start
        if "grpo_step" in parts:
            log(
                "3/6 GRPO steps, tiny default config: NF4/fp32 base x beta 0/0.04 "
                f"({settings.grpo_untimed_steps} untimed + {settings.grpo_steps} timed steps each)"
            )
            start = time.perf_counter()
            results["grpo_step"] = grpo_step.run(
                workdir,
                settings.grpo_overrides,
                settings.grpo_steps,
                settings.grpo_untimed_steps,
                threads,
                log,
            )
            wall["grpo_step"] = time.perf_counter() - start
        if "logprob_memory" in parts:
            log(
                "4/6 log-prob peak memory: selective_log_softmax vs log_softmax().gather() "
                f"({n} repeats)"
            )
            start = time.perf_counter()
            results["logprob_memory"] = logprob_memory.run(
                *settings.logprob_shape, n, threads, device, log
            )
            wall["logprob_memory"] = time.perf_counter() - start
        serve_threads = serve_threads or torch.get_num_threads()
        if "kernel" in parts or "serve" in parts:
            log(f"machine probes on {serve_threads} threads: read bandwidth, GEMM peak")
            start = time.perf_counter()
            with torch_threads(serve_threads):
                results["machine"] = kernel_speed.machine(settings.kernel_repeats, log)
            wall["machine"] = time.perf_counter() - start
        if "kernel" in parts:
            log(
                f"5/6 NF4 CPU kernel at Phi-2's shapes vs bitsandbytes vs pure PyTorch "
                f"({settings.kernel_repeats} repeats)"
            )
            start = time.perf_counter()
            results["kernel"] = kernel_speed.run(
                serve_threads, settings.kernel_repeats, log, results["machine"]
            )
            wall["kernel"] = time.perf_counter() - start
        if "serve" in parts:
            log(
                f"6/6 serving a {settings.serve_layers}-layer Phi-2-sized model: ours vs "
                f"bitsandbytes (+ peft) vs dense bf16, and the demo server ({settings.serve_calls} "
                f"calls x {settings.serve_steps} tokens per configuration)"
            )
            start = time.perf_counter()
            results["serve"] = serve.run(
                serve_threads,
                settings.serve_calls,
                settings.serve_steps,
                settings.serve_prompt_tokens,
                settings.serve_layers,
                log,
                results["machine"],
            )
            wall["serve"] = time.perf_counter() - start
    results["wall_seconds"] = {k: round(v, 1) for k, v in wall.items()}
    log("seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    json_path, md_path = args.out_dir / "results.json", args.out_dir / "results.md"
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(f"--parts {args.parts!r}: choose from {','.join(PARTS)}")
    publish = not (args.no_readme or args.quick)
    if "kernel" in parts and not args.readme_only and qlora_kernel.default_kernel() is None:
        why = "the NF4 CPU kernel is not available (QLORA_KERNEL=0, or no compiler: see above)"
        if args.parts != parser.get_default("parts"):
            parser.error(f"--parts {args.parts!r}: {why}; leave out kernel")
        print(f"bench: {why}; skipping part 5 (kernel)", file=sys.stderr)
        parts.remove("kernel")
    try:
        if args.readme_only:
            if not json_path.is_file():
                parser.error(f"--readme-only: {json_path} does not exist; run the bench first")
            results = json.loads(json_path.read_text())
            write_atomic(md_path, render_markdown(results))
            update_readme(args.readme, results)
            print(f"wrote {md_path} and the Performance blocks of {args.readme}")
            return 0
        if publish:
            check_readme(args.readme)  # fail now, not after six minutes of measuring
    except ReadmeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads < 1:
        parser.error(f"--threads {args.threads} must be >= 1")
    if args.serve_threads < 0:
        parser.error(f"--serve-threads {args.serve_threads} must be >= 1, or 0 for torch's default")
    serve_threads = args.serve_threads or torch.get_num_threads()  # before set_num_threads
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = QUICK if args.quick else FULL
    start = time.perf_counter()
    results = {
        "schema": 1,
        "quick": args.quick,
        "partial": set(parts) != set(PARTS),
        "command": shlex.join(["python", "-m", "bench.run", *(argv or sys.argv[1:])]),
        "environment": environment(device),
        "settings": asdict(settings),
    }
    results["environment"]["serve_threads"] = serve_threads
    print(
        f"bench: {results['environment']['cpu_model']}, {args.threads} thread(s) for parts 1-4, "
        f"{serve_threads} for parts 5-6, {device}; parts: {','.join(parts)}"
    )
    results.update(measure(settings, parts, args.threads, device, serve_threads=serve_threads))
    results["wall_seconds"]["total"] = round(time.perf_counter() - start, 1)
    if hasattr(os, "getloadavg"):
        results["environment"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    previous = json.loads(json_path.read_text()) if json_path.is_file() else None
    results = merge_into(previous, results, parts)
    write_atomic(json_path, json.dumps(results, indent=1) + "\n")
    write_atomic(md_path, render_markdown(results))
    print(f"wrote {json_path} and {md_path} in {results['wall_seconds']['total']:.0f} s")
    if publish:
        written = update_readme(args.readme, results, parts)
        print(f"updated {', '.join(written)} in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
