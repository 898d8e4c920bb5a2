"""`python -m app.screenshot`: the README's screenshot, taken by the browser test's code path.

    python -m app.screenshot --run-dir runs/tiny --out docs/demo.png [--prompt "47+05="]

Starts `python -m app` with every argument it does not know itself (--run-dir, --model,
--adapter, --no-quantize, --merge, ...) on a free loopback port, opens it in headless Chromium,
types the prompt (default: the first held-out evaluation prompt), clicks Compare, waits for both
answers and their rewards, and saves a full-page PNG.
"""

from __future__ import annotations

import argparse
import sys

from .__main__ import build_parser as app_parser
from .browser import BrowserMissing, compare_in_browser, serve


def default_prompt(app_args: list[str]) -> str:
    """The first held-out prompt of the run's task (what the demo lists first as an example)."""
    from .serving import task_examples
    from .spec import DemoError, resolve_spec

    args = app_parser().parse_args(app_args)
    try:
        spec = resolve_spec(args.run_dir, args.model, args.adapter, task=args.task)
    except DemoError as err:
        raise SystemExit(f"error: {err}") from err
    examples, _ = task_examples(spec)
    if not examples:
        raise SystemExit("error: the run has no task examples; fix: pass --prompt TEXT")
    return examples[0]


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
    args, app_args = parser.parse_known_args(argv)
    if "--host" in app_args or "--port" in app_args:
        parser.error("--host/--port are chosen here (a free loopback port)")
    prompt = args.prompt or default_prompt(app_args)
    try:
        with serve(app_args, timeout_s=args.timeout) as url:
            shown = compare_in_browser(url, prompt, args.out, timeout_s=args.timeout)
    except (BrowserMissing, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"screenshot: {args.out}  prompt {prompt!r}")
    for key in ("base", "tuned"):
        print(f"  {key:<5} {shown[key]!r}  {shown[key + '_reward']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
