"""`make bench`: speed, memory and footprint against the peers, as ratios, in one run (issue 7).

    python -m bench.run                 all four parts (~2.5 min on 2 shared CPU cores), then
                                        bench/results.json, bench/results.md, README section
    python -m bench.run --quick         tiny shapes, ~30 s: a smoke test, never published
    python -m bench.run --readme-only   rewrite results.md and the README from results.json

Parts: (1) layers.py: NF4Linear+LoRA vs bitsandbytes Linear4bit+LoRA vs fp32 Linear+LoRA, and
dequantization; (2) quality.py: quantization error, bits/parameter, Phi-2's NF4 footprint;
(3) grpo_step.py: GRPO steps of the tiny default config; (4) logprob_memory.py:
selective_log_softmax vs log_softmax().gather(). Parts 3 and 4 run each configuration in a
child process so that each has its own peak memory.

Threads: 1 unless --threads says otherwise, recorded in results.json. On the 2-core machine this
was tuned on, shared with other jobs (load average ~3.4), 2 torch threads made the Phi-2-shaped
layer steps ~1.3x slower than 1 thread, and GRPO steps of the tiny model (many small ops)
erratic: with 2 threads part 3 took 384 s instead of 39 s, one config's median step 13.7 s
instead of 0.46 s, so a 2-thread run overshoots the 10-minute budget. One thread gives stable
medians, and the published figures are ratios; on a dedicated machine pass --threads $(nproc).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qlora.bench import PHI2_SHAPES

from . import grpo_step, layers, logprob_memory, quality
from .measure import MIN_REPEATS, REPO_ROOT, environment
from .report import ReadmeError, check_readme, render_markdown, update_readme

PARTS = ("layers", "quality", "grpo_step", "logprob_memory")


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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (a partial run is never published)",
    )
    return parser


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_tiny_model(base_dir: Path):
    from grpo.model import load_model

    model, _ = load_model(base_dir, "float32")
    return model


def measure(settings: Settings, parts: list[str], threads: int, device, log=print) -> dict:
    """Run the chosen parts; {part: results} plus "wall_seconds"."""
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
            log("1/4 NF4 layer forward+backward vs bitsandbytes vs fp32, and dequantize")
            start = time.perf_counter()
            results["layers"] = layers.run(
                settings.layer_shapes,
                settings.layer_tokens,
                settings.lora_r,
                settings.layer_repeats,
                device,
                log,
            )
            wall["layers"] = time.perf_counter() - start
        if "quality" in parts:
            log("2/4 quantization error, bits/param, Phi-2 footprint")
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
            log("3/4 GRPO steps, tiny default config: NF4/fp32 base x beta 0/0.04")
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
            log("4/4 log-prob peak memory: selective_log_softmax vs log_softmax().gather()")
            start = time.perf_counter()
            results["logprob_memory"] = logprob_memory.run(
                *settings.logprob_shape, n, threads, device, log
            )
            wall["logprob_memory"] = time.perf_counter() - start
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
    publish = not (args.no_readme or args.quick or set(parts) != set(PARTS))
    try:
        if args.readme_only:
            if not json_path.is_file():
                parser.error(f"--readme-only: {json_path} does not exist; run the bench first")
            results = json.loads(json_path.read_text())
            write_atomic(md_path, render_markdown(results))
            update_readme(args.readme, results)
            print(f"wrote {md_path} and the Performance section of {args.readme}")
            return 0
        if publish:
            check_readme(args.readme)  # fail now, not after six minutes of measuring
    except ReadmeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads < 1:
        parser.error(f"--threads {args.threads} must be >= 1")
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
    print(f"bench: {results['environment']['cpu_model']}, {args.threads} threads, {device}")
    results.update(measure(settings, parts, args.threads, device))
    results["wall_seconds"]["total"] = round(time.perf_counter() - start, 1)
    if hasattr(os, "getloadavg"):
        results["environment"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    write_atomic(json_path, json.dumps(results, indent=1) + "\n")
    write_atomic(md_path, render_markdown(results))
    print(f"wrote {json_path} and {md_path} in {results['wall_seconds']['total']:.0f} s")
    if publish:
        update_readme(args.readme, results)
        print(f"updated the Performance section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
