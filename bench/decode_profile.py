"""Where a 2-row decode step of the demo goes: torch.profiler over the random Phi-2 of part 6.

    python -m bench.decode_profile [--int16] [--threads 2] [--steps 12] [--prompt-tokens 150]
                                   [--layers 32]

The model and adapter are part 6's (bench/serve.py: Phi-2 from its config, random bf16 weights,
a random LoRA r=16), loaded as the demo loads them (`--int16`: as `python -m app --int16` does).
Base + tuned decode as two rows of one batch, as the demo's side by side does: a prefill and 4
steps untimed, then `--steps` steps under the profiler. Operator self times are grouped by name
(GROUPS, first match wins) and printed as a Markdown table, per step and as a share of the time
the profiler gives to operators; the rest of a step is Python between them. The quantized
matmuls' row also gives the bytes they read a step and that rate against the read probe of
bench/kernel_speed.py, measured in the same run on the same threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .kernel_speed import machine
from .measure import MIN_REPEATS
from .phi2 import phi2_dir
from .serve import load, prompt_text, random_adapter

# (row label, substrings of an operator's name); first match wins. Every operator under the
# output layer's call counts as OUTPUT, whatever its name; the rest is OTHER.
GROUPS = (
    ("NF4 matmuls, int16 kernel", ("int16_matmul",)),
    ("NF4 matmuls, exact kernel", ("qlora_nf4",)),
    ("attention (scaled_dot_product_attention)", ("scaled_dot_product", "flash_attention")),
    ("LoRA (two small matmuls per linear)", ("aten::mm", "aten::linear", "aten::matmul")),
)
OUTPUT = "output layer (lm_head: our bf16 GEMV with --int16, else F.linear)"
OTHER = "everything else (elementwise, copies, rotary, layer norms)"


def group_of(event) -> str:
    """The row an operator's self time goes to."""
    parent = event
    while parent is not None:
        if parent.name == OUTPUT:
            return OUTPUT
        parent = parent.cpu_parent
    return next((label for label, keys in GROUPS if any(k in event.name for k in keys)), OTHER)


def mark_output_layer(model) -> None:
    """Run the output layer inside a profiler range named OUTPUT."""
    head = model.get_output_embeddings()
    forward = head.forward

    def marked(*args, **kwargs):
        with torch.profiler.record_function(OUTPUT):
            return forward(*args, **kwargs)

    head.forward = marked


def nf4_bytes(model) -> int:
    """Bytes of the quantized weights one step reads (repacked codes and scales when int16)."""
    from qlora import NF4Linear
    from qlora.int16_decode import RepackedNF4Weight

    def size(q) -> int:
        return q.repacked.nbytes if isinstance(q, RepackedNF4Weight) else q.nbytes

    return sum(size(m.qweight) for m in model.modules() if isinstance(m, NF4Linear))


def profile(int16: bool, steps: int, prompt_tokens: int, layers: int = 32) -> dict:
    from app.streaming import DecodeRows, Sampling
    from qlora import adapter_rows

    model_dir, adapter_dir = phi2_dir(layers), random_adapter(layers)
    model, tokenizer = load("ours", model_dir, adapter_dir, int16=int16)
    mark_output_layer(model)
    ids = tokenizer(prompt_text(prompt_tokens), return_tensors="pt")["input_ids"].repeat(2, 1)
    rows = DecodeRows(model, ids, lambda: adapter_rows(model, [1]), steps + 5)
    sampling = Sampling(max_new_tokens=steps + 5)
    seconds = []
    with torch.inference_mode():
        for _ in range(5):  # the prefill, then 4 decode steps
            rows.step(sampling)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                start = time.perf_counter()
                rows.step(sampling)
                seconds.append(time.perf_counter() - start)
    groups: dict[str, float] = {}
    for event in prof.events():
        label = group_of(event)
        groups[label] = groups.get(label, 0.0) + event.self_cpu_time_total / 1e3 / steps  # ms
    return {
        "step_ms": 1e3 * statistics.median(seconds),
        "groups": groups,
        "bytes": nf4_bytes(model),
    }


def render(p: dict, read_GBps: float) -> str:
    operators = sum(p["groups"].values())
    lines = [
        f"median step {p['step_ms']:.0f} ms ({1e3 / p['step_ms']:.1f} tokens/s per side under the "
        f"profiler), {operators:.0f} ms of it in operators; read probe {read_GBps:.1f} GB/s",
        "",
        "| part of the step | share | per step |",
        "|---|---|---|",
    ]
    order = [*(label for label, _ in GROUPS[:3]), OUTPUT, GROUPS[3][0], OTHER]
    for label in [x for x in order if x in p["groups"]]:
        ms = p["groups"][label]
        text = f"{ms:.1f} ms"
        if label.startswith("NF4 matmuls"):
            gbps = p["bytes"] / (ms / 1e3) / 1e9
            text += (
                f": {p['bytes'] / 1e9:.2f} GB, {gbps:.0f} GB/s, "
                f"{gbps / read_GBps:.2f} of the read probe"
            )
        lines.append(f"| {label} | {ms / operators:.0%} | {text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_profile", description=__doc__)
    parser.add_argument("--int16", action="store_true", help="decode as `python -m app --int16`")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=150)
    parser.add_argument("--layers", type=int, default=32, help="Phi-2's blocks to keep (32: all)")
    args = parser.parse_args(argv)
    for name in ("threads", "steps", "prompt_tokens", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    torch.set_num_threads(args.threads)
    read = machine(MIN_REPEATS, log=lambda m: None)["read_bandwidth"]["median"]
    print(render(profile(args.int16, args.steps, args.prompt_tokens, args.layers), read))
    return 0


if __name__ == "__main__":
    sys.exit(main())
