"""Seconds of one "Inside one GRPO step" run (app.explorer.explore) on a run config's model.

    python -m bench.explorer_time --config examples/smollm2_word_problems.yaml
    python -m bench.explorer_time --config examples/tiny.yaml --output_dir runs/tiny

The model is prepared as the trainer prepares it (`grpo.train.build_trainer`: the NF4 base with a
freshly initialised LoRA); each repeat explores one held-out problem with G completions and
prints the total and the phase split.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.explorer_time", description=__doc__)
    p.add_argument("--config", required=True, help="a run's YAML config")
    p.add_argument("--output_dir", default="/tmp/explorer-time", help="the run directory to use")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    from app.explorer import StepRequest, explore
    from grpo.cli import check_run, load_config
    from grpo.train import build_trainer

    cfg = check_run(dataclasses.replace(load_config(args.config), output_dir=args.output_dir))
    trainer = build_trainer(cfg, log=lambda msg: None)
    seconds = []
    for i in range(args.repeats):
        record = trainer.task.eval[i]
        request = StepRequest(record["prompt"], record["answer"], args.group_size, seed=i)
        step = explore(
            trainer.model, trainer.tokenizer, request, cfg, trainer.reward_fns,
            trainer.reward_weights,
        )  # fmt: skip
        seconds.append(step.seconds)
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in step.timings.items())
        print(f"G={args.group_size}, held-out problem {i}: {step.seconds:.2f} s ({phases})")
    print(f"median {statistics.median(seconds):.2f} s of {len(seconds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
