"""`python -m bench.word_problems_report --run-dir runs/smollm2-word-problems`: the before/after
figures of a word-problem run, from its held-out greedy completions.

For the base (eval_before.json) and the tuned model (eval_after.json; with `--evaluate`, computed
now from the run's adapter on the same NF4 base when the run did not write it):

    accuracy      final answer right (`WordProblemTask.is_correct`)
    well formed   one final `#### N` line, ended by the end token before the length limit
    length        mean completion length in tokens, the end token included

Lengths come from re-encoding each completion's text (+1 for the end token when it ended before
the limit), so they can differ from the generated count by a token where the tokenizer would
split a text differently. Writes <run-dir>/word_problems_report.json and prints Markdown tables:
the figures, accuracy by kind, and base-vs-tuned answers to the first held-out problems.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from grpo.tasks.word_problems import has_answer_line
from qlora.atomic import atomic_write_text


def side_figures(task, tokenizer, completions: list[str], max_new_tokens: int) -> dict:
    """accuracy, well_formed, mean_length, truncated and accuracy by kind of held-out greedy
    `completions` (one per task.eval record, in order)."""
    records = task.eval
    n = len(records)
    lengths, formed, cut = [], [], []
    by_kind = defaultdict(list)
    for record, text in zip(records, completions, strict=True):
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        truncated = tokens >= max_new_tokens
        lengths.append(tokens if truncated else tokens + 1)
        cut.append(truncated)
        formed.append(has_answer_line(text) and not truncated)
        by_kind[record["kind"]].append(task.is_correct(text, record["answer"]))
    return {
        "accuracy": task.accuracy(completions, records),
        "well_formed": sum(formed) / n,
        "mean_length": sum(lengths) / n,
        "truncated": sum(cut) / n,
        "accuracy_by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()},
    }


def evaluate_adapter(adapter: Path, cfg, task) -> list[str]:
    """Greedy held-out completions of a tuned model: the run's base in NF4 and `adapter`."""
    import torch

    from grpo.evaluate import evaluate
    from grpo.policy import base_path, load_model
    from qlora import load_adapter, read_adapter_config

    torch.set_num_threads(cfg.torch_threads or torch.get_num_threads())
    targets = tuple(read_adapter_config(adapter)["target_modules"])
    model, tokenizer = load_model(base_path(cfg), cfg.dtype, nf4_targets=targets)
    load_adapter(model, adapter, quantize=True)
    model.eval()
    _, completions = evaluate(model, tokenizer, task, task.eval, cfg.max_new_tokens)
    return completions


def one_line(text: str, limit: int = 90) -> str:
    flat = " ⏎ ".join(ln.strip() for ln in text.strip().splitlines() if ln.strip())
    flat = flat.replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def markdown(report: dict, task, before: list[str], after: list[str], n_samples: int) -> str:
    b, a = report["before"], report["after"]
    lines = [
        f"| held-out greedy, n = {report['n_eval']} | base (NF4) | GRPO-tuned | change |",
        "|---|---|---|---|",
        f"| accuracy | {b['accuracy']:.1%} | {a['accuracy']:.1%} | "
        f"{(a['accuracy'] - b['accuracy']) * 100:+.1f} points |",
        f"| well formed (one final `#### N` line, then the end token) | {b['well_formed']:.1%} | "
        f"{a['well_formed']:.1%} | {(a['well_formed'] - b['well_formed']) * 100:+.1f} points |",
        f"| cut off at the length limit | {b['truncated']:.1%} | {a['truncated']:.1%} | |",
        f"| mean completion length (tokens) | {b['mean_length']:.1f} | {a['mean_length']:.1f} | "
        f"{a['mean_length'] - b['mean_length']:+.1f} |",
        "",
        "| kind | " + " | ".join(b["accuracy_by_kind"]) + " |",
        "|---|" + "---|" * len(b["accuracy_by_kind"]),
        "| base | " + " | ".join(f"{v:.0%}" for v in b["accuracy_by_kind"].values()) + " |",
        "| tuned | "
        + " | ".join(f"{a['accuracy_by_kind'][k]:.0%}" for k in b["accuracy_by_kind"])
        + " |",
        "",
        "| held-out problem | gold | base | tuned |",
        "|---|---|---|---|",
    ]
    for record, base, tuned in list(zip(task.eval, before, after, strict=True))[:n_samples]:
        lines.append(
            f"| {one_line(record['question'], 120)} | {record['answer']} | {one_line(base)} | "
            f"{one_line(tuned)} |"
        )
    return "\n".join(lines)


def tuned_completions(run: Path, adapter: str | None, evaluate: bool, cfg, task) -> list[str]:
    """The tuned side's held-out completions: eval_after.json (a checkpoint's adapter gets a file
    of its own), else with `evaluate` computed now and written; FileNotFoundError otherwise."""
    path = Path(adapter or run / "adapter")
    after = run / ("eval_after.json" if adapter is None else f"eval_after_{path.parent.name}.json")
    if after.is_file():
        return json.loads(after.read_text())["completions"]
    if not evaluate:
        raise FileNotFoundError(f"{after} is missing; pass --evaluate to compute it")
    completions = evaluate_adapter(path, cfg, task)
    accuracy = task.accuracy(completions, task.eval)
    atomic_write_text(after, json.dumps({"accuracy": accuracy, "completions": completions}))
    return completions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.word_problems_report")
    parser.add_argument("--run-dir", required=True, help="a word_problems run directory")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="compute the tuned side from the run's adapter when eval_after.json is missing",
    )
    parser.add_argument(
        "--adapter",
        help="with --evaluate: the adapter to evaluate (default <run-dir>/adapter; a checkpoint's "
        "is <run-dir>/checkpoints/step-NNNNNN/adapter)",
    )
    parser.add_argument("--samples", type=int, default=8, help="base-vs-tuned rows to print")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers import AutoTokenizer

    from grpo.cli import load_config
    from grpo.policy import base_path
    from grpo.pretrained import resolve
    from grpo.tasks import load_task

    run = Path(args.run_dir)
    if not (run / "config.yaml").is_file() or not (run / "eval_before.json").is_file():
        print(
            f"error: {run} has no config.yaml and eval_before.json; train it first", file=sys.stderr
        )
        return 2
    cfg = load_config(run / "config.yaml")
    if cfg.task != "word_problems":
        print(
            f"error: {run} is a {cfg.task!r} run; this report is for word_problems", file=sys.stderr
        )
        return 2
    task = load_task(cfg)
    before = json.loads((run / "eval_before.json").read_text())["completions"]
    try:
        after = tuned_completions(run, args.adapter, args.evaluate, cfg, task)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(resolve(base_path(cfg)))
    report = {
        "adapter": str(args.adapter or run / "adapter"),
        "n_eval": len(task.eval),
        "max_new_tokens": cfg.max_new_tokens,
        "before": side_figures(task, tokenizer, before, cfg.max_new_tokens),
        "after": side_figures(task, tokenizer, after, cfg.max_new_tokens),
    }
    atomic_write_text(run / "word_problems_report.json", json.dumps(report, indent=2))
    print(markdown(report, task, before, after, args.samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
