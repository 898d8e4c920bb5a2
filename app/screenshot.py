"""`python -m app.screenshot`: the README's screenshot, taken by the browser test's code path.

    python -m app.screenshot --run-dir runs/tiny --out docs/demo.png [--prompt "47+05="]
    python -m app.screenshot --run-dir runs/tiny --out docs/explorer.png --explorer [--g 8]

Starts `python -m app` with every argument it does not know itself (--run-dir, --model,
--adapter, --no-quantize, --merge, ...) on a free loopback port, opens it in headless Chromium,
types the prompt (default: the first held-out evaluation prompt), clicks Compare, waits for both
answers and their rewards, and saves a full-page PNG. With --explorer it opens the "Inside one
GRPO step" tab instead, runs one step on the prompt and its gold answer, and saves that.
"""

from __future__ import annotations

import argparse
import sys

from .__main__ import build_parser as app_parser
from .browser import BrowserMissing, compare_in_browser, explore_in_browser, serve


def default_prompt(app_args: list[str]) -> str:
    """The first held-out prompt of the run's task (what the demo lists first as an example)."""
    return _examples(app_args)[0][0]


def gold_answer(app_args: list[str], prompt: str) -> str:
    """The prompt's gold answer in the run's task ("" when it has none)."""
    return _examples(app_args)[1].get(prompt, "")


def _examples(app_args: list[str]) -> tuple[list[str], dict[str, str]]:
    from .serving import task_examples
    from .spec import DemoError, resolve_spec

    args = app_parser().parse_args(app_args)
    try:
        spec = resolve_spec(args.run_dir, args.model, args.adapter, task=args.task)
    except DemoError as err:
        raise SystemExit(f"error: {err}") from err
    examples, answers = task_examples(spec)
    if not examples:
        raise SystemExit("error: the run has no task examples; fix: pass --prompt TEXT")
    return examples, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.screenshot", description=__doc__)
    parser.add_argument("--out", default="docs/demo.png", help="PNG to write")
    parser.add_argument("--prompt", help="prompt to type (default: first held-out prompt)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds for the server to start and for the answers",
    )
    parser.add_argument(
        "--explorer", action="store_true", help='the "Inside one GRPO step" tab after one step'
    )
    parser.add_argument("--g", type=int, default=8, help="--explorer: completions in the group")
    args, app_args = parser.parse_known_args(argv)
    if "--host" in app_args or "--port" in app_args:
        parser.error("--host/--port are chosen here (a free loopback port)")
    prompt = args.prompt or default_prompt(app_args)
    try:
        with serve(app_args, timeout_s=args.timeout) as url:
            if args.explorer:
                answer = gold_answer(app_args, prompt)
                shown = explore_in_browser(
                    url, prompt, args.out, args.g, answer, timeout_s=args.timeout
                )
            else:
                shown = compare_in_browser(url, prompt, args.out, timeout_s=args.timeout)
    except (BrowserMissing, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"screenshot: {args.out}  prompt {prompt!r}")
    if args.explorer:
        print(f"  {shown['notice'] or shown['summary']}")
        return 0
    for key in ("base", "tuned"):
        print(f"  {key:<5} {shown[key]!r}  {shown[key + '_reward']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
