"""Part 4: peak memory of the per-token log-probs at Phi-2's vocabulary, ours against the naive way.

    selective   grpo.loss.selective_log_softmax(logits, index): chunks of 512 rows, hand-written
                backward that recomputes each chunk's softmax from the saved logsumexp
    naive       torch.log_softmax(logits, -1).gather(-1, index[..., None]).squeeze(-1)

logits [B, T, V] float32 with requires_grad (in training they come out of lm_head), index [B, T].
Each method runs in its own process; per repeat the memory probe is reset with the inputs already
allocated, so every figure is memory *above* logits and index:

    forward peak        the most memory held at any time during the forward
    kept for backward   still held after the forward (what autograd saved)
    fwd+bwd peak        the most memory held during forward and backward, including the
                        [B, T, V] gradient of the logits that both methods must produce
"""

from __future__ import annotations

import gc
import time

import torch

from .measure import MemoryProbe, child_main, figure, ratio_of, run_child

METHOD_LABELS = {
    "selective": "selective_log_softmax (ours)",
    "naive": "log_softmax().gather() (naive)",
}


def naive_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def child(args: dict) -> dict:
    from grpo.loss import selective_log_softmax

    fn = {"selective": selective_log_softmax, "naive": naive_log_softmax}[args["method"]]
    device = torch.device(args["device"])
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args["batch"], args["seq"], args["vocab"])
    logits = torch.randn(shape, generator=gen, device=device).requires_grad_(True)
    index = torch.randint(0, args["vocab"], shape[:2], generator=gen, device=device)
    grad_out = torch.randn(shape[:2], generator=gen, device=device)
    probe = MemoryProbe(device)
    samples: dict[str, list[float]] = {
        k: [] for k in ("forward_peak", "kept_for_backward", "fwd_bwd_peak", "fwd_bwd_ms")
    }
    for i in range(args["repeats"] + 1):  # repeat 0 warms up (lazy init, first-touch)
        logits.grad = None
        gc.collect()
        base = probe.reset()
        start = time.perf_counter()
        logps = fn(logits, index)  # [B, T]
        forward_peak, kept = probe.peak() - base, probe.current() - base
        logps.backward(grad_out)
        fwd_bwd_peak = probe.peak() - base
        seconds = time.perf_counter() - start
        del logps
        if i == 0:
            continue
        samples["forward_peak"].append(forward_peak / 2**20)
        samples["kept_for_backward"].append(kept / 2**20)
        samples["fwd_bwd_peak"].append(fwd_bwd_peak / 2**20)
        samples["fwd_bwd_ms"].append(1e3 * seconds)
    return {"samples": samples, "logits_MiB": logits.numel() * logits.element_size() / 2**20}


def run(batch: int, seq: int, vocab: int, repeats: int, threads: int, device, log=print) -> dict:
    results = {}
    common = dict(batch=batch, seq=seq, vocab=vocab, repeats=repeats, threads=threads)
    for method in METHOD_LABELS:
        out = run_child("bench.logprob_memory", {**common, "method": method, "device": str(device)})
        logits_mib = out["logits_MiB"]
        s = out["samples"]
        results[method] = {
            "label": METHOD_LABELS[method],
            **{
                k: figure(s[k], "MiB")
                for k in ("forward_peak", "kept_for_backward", "fwd_bwd_peak")
            },
            "fwd_bwd_time": figure(s["fwd_bwd_ms"], "ms"),
        }
        r = results[method]
        log(
            f"  {r['label']}: forward peak {r['forward_peak']['median']:.0f} MiB, kept "
            f"{r['kept_for_backward']['median']:.0f} MiB, fwd+bwd peak "
            f"{r['fwd_bwd_peak']['median']:.0f} MiB above the inputs"
        )
    ratios = {
        f"{key}_selective_vs_naive": ratio_of(
            results["selective"][key],
            results["naive"][key],
            f"{key} {METHOD_LABELS['selective']}",
            f"{key} {METHOD_LABELS['naive']}",
        )
        for key in ("forward_peak", "fwd_bwd_peak", "fwd_bwd_time")
    }
    return {
        "shape": {"batch": batch, "seq": seq, "vocab": vocab, "dtype": "float32"},
        "logits_MiB": logits_mib,
        "measured_as": "peak resident set above the inputs (VmHWM reset via /proc/self/clear_refs)"
        if torch.device(device).type == "cpu"
        else "torch.cuda.max_memory_allocated above the inputs",
        "methods": results,
        "ratios": ratios,
    }


if __name__ == "__main__":
    child_main(child)
