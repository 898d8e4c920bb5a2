"""`python -m grpo.tiny.warmup_curve --config examples/tiny.yaml [--steps N] [--every K]`

The tiny model's supervised warm-up, measured as it goes: every K steps, greedy accuracy on the
train probe that `warmup_target_accuracy` watches, and held-out accuracy of the unquantized model
and of its NF4 copy (what GRPO would start from). The warm-up's learning rate is constant after
its ramp (`grpo.tiny.warmup.warmup_lr_factor`), so the model at step k here is exactly the model
a `warmup_sft_steps: k` run builds: this one curve shows what any warm-up length gives.
Writes `<output_dir>/warmup_curve.jsonl` (atomically) and prints a table. Other `--field value`
pairs override the config as in `grpo.train`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from grpo.cli import check_run, exit_on_error, parse_cli
from grpo.config import ConfigError
from grpo.tasks import load_task
from qlora.atomic import atomic_write_text


def warmup_curve(cfg, steps: int, every: int, log=print) -> list[dict]:
    import torch

    from grpo.evaluate import evaluate
    from grpo.tiny.build import build_tiny_phi
    from grpo.tiny.warmup import PROBE_SIZE, supervised_warmup
    from qlora import prepare_qlora

    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    task = load_task(cfg)
    torch.manual_seed(cfg.seed)  # as grpo.tiny.warmup.ensure_tiny_base
    model, tokenizer = build_tiny_phi(seed=cfg.seed)
    rows: list[dict] = []
    t0 = time.time()

    def measure(step: int, m) -> None:
        if step % every and step != steps:
            return
        m.eval()
        probe, _ = evaluate(m, tokenizer, task, task.train[:PROBE_SIZE], cfg.max_new_tokens)
        dense, _ = evaluate(m, tokenizer, task, task.eval, cfg.max_new_tokens)
        q = copy.deepcopy(m)
        prepare_qlora(q, target_modules=tuple(cfg.lora_targets), r=cfg.lora_r, quantize=True)
        nf4, _ = evaluate(q, tokenizer, task, task.eval, cfg.max_new_tokens)
        rows.append(
            {"step": step, "train_probe": probe, "accuracy_dense": dense, "accuracy_nf4": nf4}
        )
        log(
            f"step {step:5d}  train probe {probe:6.1%}  held-out: unquantized {dense:6.1%}  "
            f"NF4 {nf4:6.1%}  ({time.time() - t0:.0f}s)"
        )
        m.train()

    supervised_warmup(
        model,
        tokenizer,
        task.train,
        steps=steps,
        batch_size=cfg.warmup_sft_batch_size,
        learning_rate=cfg.warmup_sft_learning_rate,
        seed=cfg.seed,
        log=lambda msg: None,
        callback=measure,
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--steps", type=int, default=1000, help="warm-up steps to run")
    parser.add_argument("--every", type=int, default=50, help="measure every K steps")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = check_run(parse_cli(rest))
        if cfg.model != "tiny":
            raise ConfigError(f"model={cfg.model!r}: the warm-up curve is for model: tiny only")
        if args.steps < 1 or args.every < 1:
            raise ConfigError(
                f"--steps {args.steps} --every {args.every}: both must be positive integers"
            )
    except ConfigError as err:
        exit_on_error(err)
    rows = warmup_curve(cfg, args.steps, args.every)
    out = Path(cfg.output_dir) / "warmup_curve.jsonl"
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
