"""`make bench`: speed, memory and footprint against the peers, as ratios, in one run.

    python -m bench.run                 every part, then bench/results.json, bench/results.md
                                        and the README's Performance blocks
    python -m bench.run --parts serve   one part (or a comma-separated list): its figures replace
                                        that part's in results.json (same machine), and the
                                        README blocks that show it are rewritten
    python -m bench.run --quick         small shapes, a smoke test, never published
    python -m bench.run --readme-only   rewrite results.md and the README from results.json

Parts: (1) layer_speed.py, (2) quality.py, (3) grpo_step.py, (4) logprob_memory.py,
(5) kernel_speed.py, (6) serve.py. Parts 3, 4 and 6 run each configuration in a child process,
so that each has its own peak memory; parts 5 and 6 share one machine probe.

Threads: parts 1-4 run on --threads (default 1: on cores shared with other jobs one thread gives
the steadiest medians, and the published figures are ratios; on a dedicated machine pass
--threads $(nproc)). Parts 5 and 6 measure serving, so they run on the demo's thread count
(--serve-threads, default torch's own).
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

from qlora import kernel as qlora_kernel
from qlora.atomic import atomic_write_text

from . import grpo_step, kernel_speed, layer_speed, logprob_memory, quality, serve
from .measure import MIN_REPEATS, REPO_ROOT, environment, torch_threads
from .phi2 import PHI2_SHAPES
from .report import ReadmeError, check_readme, render_markdown, update_readme


@dataclass(frozen=True)
class Settings:
    repeats: int = 7  # repeats of every measured figure (>= MIN_REPEATS) ...
    layer_repeats: int = 15  # ... but part 1 gets more
    grpo_steps: int = 10  # ... and part 3 times this many steps per config
    layer_shapes: tuple = PHI2_SHAPES  # (out, in)
    layer_tokens: int = 512
    lora_r: int = 16
    quality_shape: tuple = (2560, 2560)  # one Phi-2 attention matrix of N(0, 1) values
    quality_seeds: int = 5
    # part 3: examples/tiny.yaml plus these. The bench measures speed, and a 50-step warm-up
    # already answers with a few digits and EOS, like the real one.
    grpo_overrides: dict = field(default_factory=lambda: {"warmup_sft_steps": 50})
    grpo_untimed_steps: int = 1
    logprob_shape: tuple = (8, 256, 51200)  # batch, tokens, Phi-2's vocabulary
    kernel_repeats: int = MIN_REPEATS  # part 5 and the machine probes
    # part 6: `serve_calls` generations of `serve_steps` tokens per configuration (each call's
    # first step is a prefill sample, the rest decode samples), a GSM8K-sized prompt
    serve_calls: int = MIN_REPEATS
    serve_steps: int = 8
    serve_prompt_tokens: int = 150
    serve_layers: int = 32  # Phi-2's depth


FULL = Settings()
QUICK = Settings(
    repeats=MIN_REPEATS,
    layer_repeats=MIN_REPEATS,
    grpo_steps=MIN_REPEATS,
    layer_shapes=((256, 256), (1024, 256), (256, 1024)),
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


@dataclass
class Run:
    """What the parts of one run share: its settings, threads, device and scratch directory,
    and the tiny base and machine probe, each measured once when a part first needs it."""

    settings: Settings
    threads: int
    serve_threads: int
    device: torch.device
    workdir: str
    log: object = print
    base: Path | None = None
    machine: dict | None = None

    def tiny_base(self) -> Path:
        if self.base is None:
            self.log("setup: warmed-up tiny Phi base (shared by parts 2 and 3)")
            self.base = grpo_step.build_base(self.workdir, self.settings.grpo_overrides)
        return self.base

    def machine_probe(self) -> dict:
        if self.machine is None:
            self.log(f"machine probes on {self.serve_threads} threads: read bandwidth, GEMM peak")
            with torch_threads(self.serve_threads):
                self.machine = kernel_speed.machine(self.settings.kernel_repeats, self.log)
        return self.machine


def layers(run: Run) -> dict:
    s = run.settings
    shapes, tokens, r, n = s.layer_shapes, s.layer_tokens, s.lora_r, s.layer_repeats
    return layer_speed.run(shapes, tokens, r, n, run.device, run.log)


def quality_part(run: Run) -> dict:
    from grpo.policy import load_model

    tiny, _ = load_model(run.tiny_base(), "float32")
    return quality.run(run.settings.quality_shape, run.settings.quality_seeds, tiny, run.log)


def grpo_steps(run: Run) -> dict:
    s = run.settings
    run.tiny_base()
    steps, untimed = s.grpo_steps, s.grpo_untimed_steps
    return grpo_step.run(run.workdir, s.grpo_overrides, steps, untimed, run.threads, run.log)


def logprob(run: Run) -> dict:
    shape, n = run.settings.logprob_shape, run.settings.repeats
    return logprob_memory.run(*shape, n, run.threads, run.device, run.log)


def kernel(run: Run) -> dict:
    probe = run.machine_probe()
    return kernel_speed.run(run.serve_threads, run.settings.kernel_repeats, run.log, probe)


def serving(run: Run) -> dict:
    s = run.settings
    probe = run.machine_probe()
    calls, steps, prompt = s.serve_calls, s.serve_steps, s.serve_prompt_tokens
    return serve.run(run.serve_threads, calls, steps, prompt, s.serve_layers, run.log, probe)


# name -> (what it measures, function), in the order they run
PARTS = {
    "layers": ("NF4 layer forward+backward vs bitsandbytes vs fp32, and dequantize", layers),
    "quality": ("quantization error, bits/param, Phi-2 footprint", quality_part),
    "grpo_step": ("GRPO steps, tiny default config: NF4/fp32 base x beta 0/0.04", grpo_steps),
    "logprob_memory": ("log-prob peak memory: selective vs log_softmax().gather()", logprob),
    "kernel": ("NF4 CPU kernel at Phi-2's shapes vs bitsandbytes vs pure PyTorch", kernel),
    "serve": ("serving a Phi-2-sized model: ours vs bitsandbytes (+ peft) vs dense bf16", serving),
}


def measure(
    settings: Settings, parts: list[str], threads: int, device, log=print, serve_threads=None
) -> dict:
    """Run the chosen parts; {part: results} plus "wall_seconds" (and "machine", the probes the
    kernel and serving parts share, when either runs)."""
    results: dict = {}
    wall: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as workdir:
        run = Run(settings, threads, serve_threads or torch.get_num_threads(), device, workdir, log)
        for i, (name, (what, part)) in enumerate(PARTS.items(), 1):
            if name in parts:
                log(f"{i}/{len(PARTS)} {what}")
                start = time.perf_counter()
                results[name] = part(run)
                wall[name] = round(time.perf_counter() - start, 1)
    if run.machine is not None:
        results["machine"] = run.machine
    results["wall_seconds"] = wall
    log("seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()))
    return results


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
    for part in [p for p in PARTS if p in previous and p not in parts]:
        results[part] = previous[part]
        results["measured"][part] = previous.get("measured", {}).get(part, prior_stamp)
        if part in previous.get("wall_seconds", {}):
            results["wall_seconds"].setdefault(part, previous["wall_seconds"][part])
    if "machine" not in results and "machine" in previous:
        results["machine"] = previous["machine"]
    results["partial"] = not all(p in results for p in PARTS)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny shapes (smoke test)")
    add("--out-dir", type=Path, default=REPO_ROOT / "bench", help="where results.{json,md} go")
    add("--readme", type=Path, default=REPO_ROOT / "README.md")
    add("--no-readme", action="store_true", help="leave the README alone")
    add("--readme-only", action="store_true", help="measure nothing: render from results.json")
    add("--threads", type=int, default=1, help="torch threads of parts 1-4 (default 1)")
    add("--serve-threads", type=int, default=0, help="torch threads of parts 5-6 (0: torch's)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--parts", default=",".join(PARTS), help=f"a comma-separated subset of {','.join(PARTS)}")
    return parser


def chosen_parts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """--parts checked, without the kernel part when the kernel cannot be built (an error when
    it was asked for by name)."""
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts {args.parts!r}: choose from {','.join(PARTS)}")
    if args.threads < 1:
        parser.error(f"--threads {args.threads} must be >= 1")
    if args.serve_threads < 0:
        parser.error(f"--serve-threads {args.serve_threads} must be >= 1, or 0 for torch's default")
    if "kernel" in parts and not args.readme_only and qlora_kernel.default_kernel() is None:
        why = "the NF4 CPU kernel is not available (QLORA_KERNEL=0, or no compiler: see above)"
        if args.parts != parser.get_default("parts"):
            parser.error(f"--parts {args.parts!r}: {why}; leave out kernel")
        print(f"bench: {why}; skipping part 5 (kernel)", file=sys.stderr)
        parts.remove("kernel")
    return parts


def write_results(args: argparse.Namespace, results: dict, parts: list[str] | None) -> None:
    json_path, md_path = args.out_dir / "results.json", args.out_dir / "results.md"
    if parts is not None:  # a new measurement, merged with the last one
        previous = json.loads(json_path.read_text()) if json_path.is_file() else None
        results = merge_into(previous, results, parts)
        atomic_write_text(json_path, json.dumps(results, indent=1) + "\n")
    atomic_write_text(md_path, render_markdown(results))
    print(f"wrote {md_path}" + (f" and {json_path}" if parts is not None else ""))
    if args.readme_only or not (args.no_readme or args.quick):
        written = update_readme(args.readme, results, parts)
        print(f"updated {', '.join(written)} in {args.readme}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    parts = chosen_parts(parser, args)
    json_path = args.out_dir / "results.json"
    try:
        if args.readme_only:
            if not json_path.is_file():
                parser.error(f"--readme-only: {json_path} does not exist; run the bench first")
            write_results(args, json.loads(json_path.read_text()), None)
            return 0
        if not (args.no_readme or args.quick):
            check_readme(args.readme)  # fail now, not after minutes of measuring
    except ReadmeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
        "environment": {**environment(device), "serve_threads": serve_threads},
        "settings": asdict(settings),
    }
    print(
        f"bench: {results['environment']['cpu_model']}, {args.threads} thread(s) for parts 1-4, "
        f"{serve_threads} for parts 5-6, {device}; parts: {','.join(parts)}"
    )
    results.update(measure(settings, parts, args.threads, device, serve_threads=serve_threads))
    results["wall_seconds"]["total"] = round(time.perf_counter() - start, 1)
    results["environment"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    write_results(args, results, parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
