"""`python -m bench.results runs/tiny`: the README's results block, rendered from a run directory.

Every figure of the block comes from the run directory `make train` wrote (summary.json,
config.yaml, eval.jsonl, base/warmup.json), the machine line from the one the run recorded. The
block rewriter here is shared by every tool that writes a README block (bench/report.py,
bench/phi2_scale.py): each replaces the text between its own two marker lines, atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from qlora.atomic import atomic_write_text

START, END = "<!-- results:start -->", "<!-- results:end -->"
# config fields the results line names: the ones that make the run what it is
CONFIG_SHOWN = (
    "max_steps prompts_per_step num_generations temperature learning_rate lr_schedule beta "
    "loss_type lora_r reward_funcs"
).split()


class ReadmeError(RuntimeError):
    """A file cannot take a generated block (missing file, or its markers missing or repeated)."""


# ---------------------------------------------------------------------------------------------
# The block rewriter
# ---------------------------------------------------------------------------------------------


def check_block(text: str, start: str, end: str, where: str = "the README") -> None:
    """Raise ReadmeError unless `start` occurs once, then `end` once, each on a line of its own."""
    starts, ends = text.count(start), text.count(end)
    fix = f"put the two marker lines {start} and {end} where the generated block goes"
    if starts != 1 or ends != 1:
        raise ReadmeError(
            f"{where} must hold {start} once and {end} once (found {starts} and {ends}); {fix}"
        )
    if text.index(start) > text.index(end):
        raise ReadmeError(f"{where} has {end} before {start}; {fix}")
    lines = text.splitlines()
    if start not in lines or end not in lines:
        raise ReadmeError(f"{where}: {start} and {end} must each stand alone on a line; {fix}")


def replace_block(text: str, start: str, end: str, body: str, where: str = "the README") -> str:
    """`text` with the lines between the marker lines replaced by `body`; markers and everything
    outside them unchanged, so applying it twice gives the same text."""
    check_block(text, start, end, where)
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = body.strip("\n")
    return f"{head}{start}\n{body}\n{end}{tail}" if body else f"{head}{start}\n{end}{tail}"


def read_checked(path: Path, start: str, end: str) -> str:
    """The text of `path`, or ReadmeError naming the file and the markers it needs."""
    path = Path(path)
    if not path.is_file():
        raise ReadmeError(f"{path} does not exist; create it with the lines {start} and {end}")
    text = path.read_text()
    check_block(text, start, end, str(path))
    return text


def rewrite_block(path: Path, start: str, end: str, body: str) -> None:
    """Replace the block of `path` between its markers with `body`, atomically."""
    path = Path(path)
    text = replace_block(read_checked(path, start, end), start, end, body, str(path))
    atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------
# The machine a run was measured on
# ---------------------------------------------------------------------------------------------


def machine_text(m: dict) -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores, 2 torch threads' from a `machine()` dict."""
    cores, threads = m.get("cpu_count"), m.get("torch_threads")
    parts = [m.get("cpu_model") or "unknown CPU"]
    if cores:
        parts.append(f"{cores} core{'s' if cores != 1 else ''}")
    if threads:
        parts.append(f"{threads} torch thread{'s' if threads != 1 else ''}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# The results block
# ---------------------------------------------------------------------------------------------


def base_name(s: dict, cfg: dict) -> str:
    """What GRPO trained on top of, from the run's own settings."""
    return "NF4" if s.get("quantize", cfg.get("quantize")) else str(cfg.get("dtype", "unquantized"))


def method_name(s: dict, cfg: dict) -> str:
    if not s.get("use_lora", cfg.get("use_lora", True)):
        return f"full fine-tuning of the {base_name(s, cfg)} model"
    r = cfg.get("lora_r")
    return f"LoRA{f' r={r}' if r else ''} on the {base_name(s, cfg)} base"


def config_text(cfg: dict) -> str:
    def value(v):
        return ",".join(map(str, v)) if isinstance(v, list) else v

    return ", ".join(f"{k}={value(cfg[k])}" for k in CONFIG_SHOWN if k in cfg)


def accuracy_table(run_dir: Path, s: dict, cfg: dict) -> list[str]:
    gain = (s["accuracy_after"] - s["accuracy_before"]) * 100
    lines = [f"| held-out greedy accuracy (n = {s['n_eval']}) | value |", "|---|---|"]
    if s.get("accuracy_dense_base") is not None:
        dense = s["accuracy_dense_base"]
        lines.append(f"| warm-up model, unquantized (for reference) | {dense:.1%} |")
    lines += [
        f"| **before GRPO**: the {base_name(s, cfg)} base GRPO starts from "
        f"| **{s['accuracy_before']:.1%}** |",
        f"| **after GRPO** ({s['grpo_steps']} steps, {method_name(s, cfg)}) "
        f"| **{s['accuracy_after']:.1%}** |",
        f"| gain | {gain:+.1f} points |",
    ]
    evals = run_dir / "eval.jsonl"
    lines_of = evals.read_text().splitlines() if evals.is_file() else []
    points = [json.loads(x) for x in lines_of if x.strip()]
    if points:
        during = ", ".join(f"step {p['step']}: {p['accuracy']:.1%}" for p in points)
        lines.append(f"| during GRPO (`eval.jsonl`) | {during} |")
    return lines


def time_table(run_dir: Path, s: dict) -> list[str]:
    lines = ["| time | seconds |", "|---|---|"]
    warm = run_dir / "base" / "warmup.json"
    if warm.is_file():
        seconds = json.loads(warm.read_text())["warmup_seconds"]
        lines.append(f"| supervised warm-up (cached in `{run_dir}/base`) | {seconds:.0f} |")
    return lines + [
        f"| GRPO ({s['grpo_steps']} steps) | {s['grpo_seconds']:.0f} |",
        f"| whole run (`total_seconds`) | {s['total_seconds']:.0f} |",
    ]


def render(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    where = (
        machine_text(s["machine"])
        if "machine" in s
        else f"a machine the run did not record ({s.get('torch_threads', '?')} torch thread(s))"
    )
    lines = [
        f"Measured by the run in `{run_dir}` (its whole config: `{run_dir}/config.yaml`) on "
        f"{where}; figures from `{run_dir}/summary.json`, rendered by "
        f"`python -m bench.results {run_dir}`.",
        "",
        *accuracy_table(run_dir, s, cfg),
        "",
        *time_table(run_dir, s),
        "",
        f"Trainable parameters: {s['trainable_parameters']:,} of {s['total_parameters']:,}; "
        f"stored model {s['bytes'] / 2**20:.2f} MiB. Config: {config_text(cfg)}.",
    ]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, run_dir: Path) -> None:
    rewrite_block(readme, START, END, render(run_dir))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run = Path(argv[0] if argv else "runs/tiny")
    readme = Path(argv[1] if len(argv) > 1 else "README.md")
    if not (run / "summary.json").is_file():
        print(f"error: {run}/summary.json does not exist; run `make train` first", file=sys.stderr)
        return 2
    try:
        update_readme(readme, run)
    except ReadmeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{readme} results updated from {run}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
