"""`python -m app`: serve the base-vs-tuned demo (what `make demo` runs).

    python -m app --run-dir runs/tiny                       # a run written by `make train`
    python -m app --model microsoft/phi-2 --adapter DIR     # any peft-format LoRA adapter
    python -m app --run-dir runs/tiny --no-quantize --merge --port 7861

A missing or mismatched run, model or adapter is one line on stderr naming the path and the fix,
and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from grpo.choices import DTYPES
from grpo.tasks import TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    p.add_argument(
        "--run-dir",
        help="run directory written by `make train` (config.yaml, "
        "base/ for the tiny model, adapter/, summary.json), e.g. runs/tiny",
    )
    p.add_argument(
        "--model",
        help="hub id or save_pretrained directory; overrides the run's "
        "(default with --adapter alone: the adapter's base_model_name_or_path)",
    )
    p.add_argument(
        "--adapter",
        help="peft-format LoRA directory (adapter_config.json + "
        "adapter_model.safetensors); overrides the run's",
    )
    p.add_argument(
        "--no-quantize",
        dest="quantize",
        action="store_false",
        help="keep the base in its dtype instead of NF4",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        help="dtype of the weights that stay unquantized and of the compute (default: the run's; "
        "without a run, auto: float32 for a model under 50M parameters, else bfloat16)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="run the tuned model as a merged, "
        "dequantized copy (W + s B A): faster CPU generation, more memory",
    )
    p.add_argument(
        "--int16",
        action="store_true",
        help="decode with the int16 NF4 kernel (int16 activations and code table, a bfloat16 GEMV "
        "for the output layer): faster than the default exact kernel, within a bounded rounding "
        "of it (the README gives its effect on predictions)",
    )
    p.add_argument(
        "--task",
        choices=TASKS,
        help="task for examples and rewards (default: the run's)",
    )
    p.add_argument(
        "--max-new-tokens-cap",
        type=int,
        default=256,
        help="upper limit of the max-new-tokens slider and of API calls",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="generations served at once; the queue holds the rest (default 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0: 1 for models under 50M parameters such as the tiny "
        "Phi, else torch's choice)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.run_dir is None and args.adapter is None:
        print(
            "error: nothing to serve; fix: pass --run-dir runs/tiny (after `make train`) or "
            "--adapter DIR [--model MODEL]",
            file=sys.stderr,
        )
        return 2
    from .spec import DemoError, resolve_spec  # no torch yet: a bad path fails fast

    try:
        spec = resolve_spec(
            args.run_dir,
            args.model,
            args.adapter,
            quantize=args.quantize,
            merge=args.merge,
            int16=args.int16,
            task=args.task,
            max_new_tokens_cap=args.max_new_tokens_cap,
            dtype=args.dtype,
        )
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a demo
    import torch
    from transformers.utils import logging as hf_logging

    from grpo.policy import SMALL_MODEL_PARAMS

    from .serving import load_demo
    from .worker import ModelThread

    hf_logging.disable_progress_bar()  # stderr is for errors: one line each
    mode = ("NF4" if spec.quantize else "not quantized") + (", merged" if spec.merge else "")
    mode += ", int16 decoding" if spec.int16 and spec.quantize else ""
    print(f"demo: loading {spec.model} + adapter {spec.adapter} ({mode})", flush=True)
    # the model is loaded on, and every forward pass runs on, this one thread (app/worker.py)
    worker = ModelThread()
    if args.threads:
        worker.run(torch.set_num_threads, args.threads)
    try:
        demo = worker.run(load_demo, spec, worker.run)
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.threads and demo.info["total_params"] < SMALL_MODEL_PARAMS:
        # tiny matmuls: thread hand-offs cost more than they save, more so on a busy box
        worker.run(torch.set_num_threads, 1)
    print(f"demo: {worker.run(torch.get_num_threads)} torch thread(s)", flush=True)
    from .ui import CSS, build_app

    app = build_app(demo, concurrency_limit=args.concurrency)
    print(f"demo: serving on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    app.launch(
        server_name=args.host, server_port=args.port, ssr_mode=False, css=CSS, show_error=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
