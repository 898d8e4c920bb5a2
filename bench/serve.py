"""Part 6: serving a Phi-2-sized model on CPU, the demo's job: ours vs bitsandbytes vs dense bf16.

The model is Phi-2 built from its config with random bf16 weights (bench/phi2.py, cached), the
adapter a random LoRA r=16 on all six linears of every block, saved in peft's format. Greedy
decoding, a prompt of `prompt_tokens` tokens, every path at the demo's thread count. Each
configuration runs in its own process, so its peak RSS (VmHWM: everything the process ever held
resident, interpreter and libraries included) is its own:

    ours           load_model(nf4_targets) + load_adapter, as the demo loads it. Decode of 2 rows
                   (base + tuned: app.streaming.PairGenerator, the demo's own loop) and of 1 row
                   (the tuned model alone); prefill = time to the first token of the 2 rows.
    ours, int16    the same, loaded as `python -m app --int16` loads it: decode through
                   qlora.int16_decode (the repacked layout in place of the NF4 bytes, the output
                   layer as its GEMV); prefill stays on the exact path.
    server         `python -m app --model DIR --adapter DIR` itself: one /compare call, the
                   speed lines the demo shows, and the server's peak RSS; again with --int16.
    bitsandbytes   transformers `load_in_4bit` (nf4, double quant, bf16 compute), then a peft
                   adapter on it: 1 row each (a side-by-side demo on it needs two passes a token).
    dense bf16     the unquantized model, 1 row: what `--merge` or no quantization would serve.

decode tokens/s per side = 1 / step time (2 rows: each step gives both sides a token); prefill =
the first step (the whole prompt through the model, then the first token). Derived figures, against
the machine probes of the same run (bench/kernel_speed.py `machine`: a sum over a 1 GiB tensor, a
3072^3 GEMM, on the same threads):

    read bandwidth used   step_bytes / median step time, as a fraction of the probe's GB/s, where
                          step_bytes = every NF4 code and block scale (int16: the repacked codes
                          and their scales) + every other parameter but the embedding table (a
                          decode step reads one row of it); for the 2-row paths of both routes
    prefill GFLOP/s       prefill_flops / median prefill time, as a fraction of the bf16 GEMM peak,
                          where prefill_flops = 2 rows T sum(in x out of the quantized linears)
                          + 4 rows layers T^2 hidden (attention scores and values)
                          + 2 rows hidden vocab (lm_head on the last position only)
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch

from grpo.pretrained import cache_root
from qlora.atomic import atomic_dir
from qlora.model import PHI_TARGETS

from .layer_speed import bnb_nf4_config
from .measure import (
    child_main,
    current_rss_bytes,
    exact,
    figure,
    peak_rss_bytes,
    ratio_of,
    run_child,
)
from .phi2 import phi2_config, phi2_dir

LORA_R, LORA_ALPHA = 16, 32
# (result key, process, measurement, rows, label): the table's rows, top to bottom
PATHS = (
    ("ours_rows2", "ours", "rows2", 2, "ours: NF4Linear + LoRA, base + tuned in one pass"),
    ("ours_rows1", "ours", "rows1", 1, "ours: NF4Linear + LoRA, tuned alone"),
    ("ours_int16_rows2", "ours_int16", "rows2", 2, "ours, int16 decode: base + tuned in one pass"),
    ("ours_int16_rows1", "ours_int16", "rows1", 1, "ours, int16 decode: tuned alone"),
    ("bitsandbytes_rows1", "bitsandbytes", "rows1", 1, "bitsandbytes load_in_4bit"),
    ("bitsandbytes_peft_rows1", "bitsandbytes", "rows1_peft", 1,
     "bitsandbytes load_in_4bit + peft LoRA"),
    ("dense_bf16_rows1", "dense_bf16", "rows1", 1, "dense bf16 (no quantization)"),
)  # fmt: skip
PEER = "bitsandbytes_rows1"
# process -> (configuration, int16 decoding): one child process each
PROCESSES = {
    "ours": ("ours", False),
    "ours_int16": ("ours", True),
    "bitsandbytes": ("bitsandbytes", False),
    "dense_bf16": ("dense_bf16", False),
}
# result key -> (the demo's flags beyond --model and --adapter, label)
SERVERS = {
    "server": ((), "ours: the demo server"),
    "server_int16": (("--int16",), "ours, int16 decode: the demo server"),
}


def random_adapter(num_layers: int = 32, seed: int = 0) -> Path:
    """A peft-format LoRA adapter for the random Phi-2 with B != 0 (so tuned != base), cached."""
    from safetensors.torch import save_file

    directory = cache_root() / f"phi2-random-{num_layers}L-lora-r{LORA_R}-seed{seed}"
    if (directory / "adapter_model.safetensors").is_file():
        return directory
    cfg = phi2_config(num_layers)
    h, ff = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "dense": (h, h)}
    shapes |= {"fc1": (h, ff), "fc2": (ff, h)}  # (in, out)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for name, (d_in, d_out) in shapes.items():
            block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "dense") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{name}"
            bound = 1 / math.sqrt(d_in)
            tensors[f"{key}.lora_A.weight"] = (
                torch.rand(LORA_R, d_in, generator=g) * 2 - 1
            ) * bound
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, LORA_R, generator=g) * 0.01
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(PHI_TARGETS),
        "bias": "none",
        "base_model_name_or_path": str(phi2_dir(num_layers)),
    }
    with atomic_dir(directory) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return directory


def prompt_text(tokens: int) -> str:
    """A GSM8K-like prompt of `tokens` characters (the character tokenizer: one token each)."""
    text = "Instruct: Natalia sold clips to 48 of her friends in April, and then she sold half "
    text += "as many clips in May. How many clips did Natalia sell altogether in April and May?"
    return (text * (tokens // len(text) + 1))[:tokens]


def step_bytes(model) -> int:
    """Bytes of weights one decode step reads: every NF4 code and block scale (of a weight served
    repacked: the int16 codes and scales), and every other parameter (lm_head, LoRA, norms,
    biases) but the embedding table, of which one row is read."""
    from qlora import NF4Linear
    from qlora.int16_decode import RepackedNF4Weight

    def weight_bytes(q) -> int:
        return q.repacked.nbytes if isinstance(q, RepackedNF4Weight) else q.nbytes

    total = sum(weight_bytes(m.qweight) for m in model.modules() if isinstance(m, NF4Linear))
    embed = model.get_input_embeddings().weight
    return total + sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


def prefill_flops(model, rows: int, tokens: int) -> int:
    """Multiply-adds x 2 of a prefill of `rows` x `tokens` (formula in the module docstring)."""
    from qlora import NF4Linear

    cfg = model.config
    linear = sum(
        m.qweight.shape[0] * m.qweight.shape[1] for m in model.modules() if isinstance(m, NF4Linear)
    )
    attention = 4 * cfg.num_hidden_layers * tokens * tokens * cfg.hidden_size
    return rows * (2 * tokens * linear + attention + 2 * cfg.hidden_size * cfg.vocab_size)


def decode_times(rows, steps: int) -> tuple[float, list[float]]:
    """(prefill seconds, decode step seconds) of `steps` greedy steps of app.streaming's loop."""
    from app.streaming import Sampling

    sampling = Sampling(steps)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        rows.step(sampling)
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


def measure_rows(make_rows, calls: int, steps: int) -> dict:
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(calls):
            first, rest = decode_times(make_rows(), steps)
            prefill.append(first)
            decode.extend(rest)
    return {"prefill_seconds": prefill, "decode_step_seconds": decode}


def load(kind: str, model_dir: Path, adapter_dir: Path, int16: bool = False):
    """(model, tokenizer) of one configuration; ours is loaded as the demo loads it (`int16`:
    as `python -m app --int16` does)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "ours":
        from app.serving import load_demo
        from app.spec import resolve_spec

        demo = load_demo(resolve_spec(None, str(model_dir), str(adapter_dir), int16=int16))
        if int16 and not demo.info["decode"].startswith("int16"):
            raise RuntimeError(
                f"the int16 decode kernel did not load (decode: {demo.info['decode']}); "
                "check that a C++ compiler is installed and QLORA_INT16 is not 0"
            )
        pair = demo.generator
        assert pair.one_pass
        return pair.base_model, pair.tokenizer
    quant = bnb_nf4_config() if kind == "bitsandbytes" else None
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map="cpu"
    )
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def child(args: dict) -> dict:
    """In a fresh process: load one configuration, then time prefill and decode."""
    import contextlib

    from app.streaming import DecodeRows
    from qlora import adapter_rows

    kind, calls, steps, tokens = args["config"], args["calls"], args["steps"], args["prompt_tokens"]
    int16 = args.get("int16", False)
    start = time.perf_counter()
    model, tokenizer = load(kind, Path(args["model_dir"]), Path(args["adapter_dir"]), int16)
    out: dict = {"config": kind, "int16": int16, "threads": torch.get_num_threads()}
    out["load_seconds"] = time.perf_counter() - start
    out["rss_after_load_bytes"] = current_rss_bytes()
    ids = tokenizer(prompt_text(tokens), return_tensors="pt")["input_ids"]
    assert ids.shape[1] == tokens, ids.shape

    def rows(m, setting=contextlib.nullcontext, batch=ids):
        return measure_rows(lambda: DecodeRows(m, batch, setting, steps), calls, steps)

    if kind == "ours":  # base + tuned as two rows of one batch, the LoRA update on row 1
        out["rows2"] = rows(model, lambda: adapter_rows(model, [1]), ids.repeat(2, 1))
        out["step_bytes"] = step_bytes(model)
        out["prefill_flops_rows2"] = prefill_flops(model, 2, tokens)
    out["rows1"] = rows(model)
    if kind == "bitsandbytes":
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, args["adapter_dir"]).eval()
        out["rows1_peft"] = rows(peft_model.get_base_model())
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def server_child(
    model_dir: Path, adapter_dir: Path, prompt_tokens: int, steps: int, flags=()
) -> dict:
    """The demo server itself (with `flags`): start it, one /compare call, read its speed lines
    and peak RSS."""
    from gradio_client import Client

    from app.browser import serve

    start = time.perf_counter()
    argv = ["--model", str(model_dir), "--adapter", str(adapter_dir), *flags]
    with serve(argv, timeout_s=900) as url:
        ready = time.perf_counter() - start
        client = Client(url, verbose=False)
        prompt = prompt_text(prompt_tokens)
        t0 = time.perf_counter()
        base, tuned, base_speed, tuned_speed = client.predict(
            prompt, steps, 1.0, 1.0, True, api_name="/compare"
        )
        call = time.perf_counter() - t0
        status = Path(f"/proc/{url.pid}/status").read_text()
        peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    return {
        "ready_seconds": ready,
        "base": parse_speed_line(base_speed),
        "tuned": parse_speed_line(tuned_speed),
        "compare_seconds": call,
        "base_speed": base_speed,
        "tuned_speed": tuned_speed,
        "peak_rss_bytes": peak,
        "answer_lengths": [len(base), len(tuned)],
    }


def parse_speed_line(line: str) -> dict:
    """{"first_token_seconds", "tokens_per_second"} from a pane's speed line
    (`12 tokens · first after 0.40 s · 9.1 tokens/s`); None for a figure the line lacks."""
    first = re.search(r"first after ([0-9.]+) s", line or "")
    rate = re.search(r"([0-9.]+) tokens/s", line or "")
    return {
        "first_token_seconds": float(first.group(1)) if first else None,
        "tokens_per_second": float(rate.group(1)) if rate else None,
    }


def run(threads, calls, steps, prompt_tokens, num_layers, log, machine_probe: dict) -> dict:
    """Every configuration on `threads` threads; `machine_probe`: the run's machine() probes."""
    model_dir = phi2_dir(num_layers, log=log)
    adapter_dir = random_adapter(num_layers)
    common = dict(
        model_dir=str(model_dir),
        adapter_dir=str(adapter_dir),
        calls=calls,
        steps=steps,
        prompt_tokens=prompt_tokens,
        threads=threads,
    )
    raw = {}
    for name, (kind, int16) in PROCESSES.items():
        args = {**common, "config": kind, "int16": int16}
        raw[name] = run_child("bench.serve", args, timeout=1800)
        log(f"  {name}: loaded in {raw[name]['load_seconds']:.0f} s")
    for name, (flags, _) in SERVERS.items():
        raw[name] = server_child(model_dir, adapter_dir, prompt_tokens, steps, flags)
        log(f"  {name}: ready in {raw[name]['ready_seconds']:.0f} s")
    return summarize(raw, {**common, "num_layers": num_layers}, log, machine_probe)


def path_figures(raw: dict) -> dict:
    """Per path: decode tokens/s per side (1 / step time), prefill, peak RSS and load time."""
    paths = {}
    for key, process, measured, rows, label in PATHS:
        r, proc = raw[process][measured], raw[process]
        paths[key] = {
            "label": label,
            "rows": rows,
            "decode_tokens_per_second_per_side": figure(
                [1.0 / s for s in r["decode_step_seconds"]], "tokens/s"
            ),
            "decode_step_seconds": figure(r["decode_step_seconds"], "s"),
            "prefill_seconds": figure(r["prefill_seconds"], "s"),
            "peak_rss_GB": exact(proc["peak_rss_bytes"] / 1e9, "GB", of="its process"),
            "load_seconds": exact(proc["load_seconds"], "s"),
        }
    return paths


def server_figures(server: dict, label: str, flags=()) -> dict:
    """The demo server's figures, from its two panes' speed lines: both panes stream from one
    pass, so they differ only by rounding; the slower one is taken."""
    rates = [server[side]["tokens_per_second"] for side in ("base", "tuned")]
    firsts = [server[side]["first_token_seconds"] for side in ("base", "tuned")]
    return {
        "label": label,
        "command": " ".join(["python -m app --model DIR --adapter DIR", *flags]),
        "rows": 2,
        "tokens_per_second_per_side": exact(min(rates), "tokens/s") if None not in rates else None,
        "first_token_seconds": exact(max(firsts), "s") if None not in firsts else None,
        "peak_rss_GB": exact(server["peak_rss_bytes"] / 1e9, "GB", of="the server process"),
        "ready_seconds": exact(server["ready_seconds"], "s"),
    }


def ratios_to_peer(paths: dict, servers: dict) -> dict:
    """Decode speed and peak RSS of every path and server against bitsandbytes' single stream."""
    peer = paths[PEER]
    speed = "decode_tokens_per_second_per_side"
    peer_speed = peer["label"] + ", tokens/s"
    ratios = {
        f"{key}_decode_vs_bnb": ratio_of(
            p[speed], peer[speed], p["label"] + ", tokens/s per side", peer_speed
        )
        for key, p in paths.items()
        if key != PEER
    }
    for key, s in servers.items():
        if s["tokens_per_second_per_side"] is not None:
            num = s["label"] + ", tokens/s per side"
            ratios[f"{key}_decode_vs_bnb"] = ratio_of(
                s["tokens_per_second_per_side"], peer[speed], num, peer_speed
            )
    peer_rss = peer["label"] + " (+ peft), peak RSS"
    rss_paths = ("ours_rows2", "ours_int16_rows2", "dense_bf16_rows1")
    for key, p in (*((k, paths[k]) for k in rss_paths), *servers.items()):
        rss = ratio_of(p["peak_rss_GB"], peer["peak_rss_GB"], p["label"] + ", peak RSS", peer_rss)
        ratios[f"{key}_peak_rss_vs_bnb"] = rss
    return ratios


def decode_bandwidth(step_bytes: int, path: dict, read_GBps: float, prefix: str = "") -> dict:
    """Bytes one decode step reads, at `path`'s median step, against the read probe."""
    step_gb, step = step_bytes / 1e9, path["decode_step_seconds"]["median"]
    return {
        f"{prefix}step_GB": exact(step_gb, "GB", of="weights one decode step reads"),
        f"{prefix}decode_read_GBps": exact(step_gb / step, "GB/s", of="2 rows"),
        f"{prefix}decode_bandwidth_fraction": exact(
            step_gb / step / read_GBps, "x", of="the read probe"
        ),
        f"{prefix}decode_steps_per_second_ceiling": exact(
            read_GBps / step_gb, "steps/s", of="probe / step"
        ),
    }


def derived_figures(raw: dict, paths: dict, machine_probe: dict) -> dict:
    """Bytes read per decode step (both routes) and prefill FLOP/s (module docstring) against
    the machine probes; a side-by-side demo on bitsandbytes (one pass of the base and one of
    base + peft per token) against ours."""
    ours, two = raw["ours"], paths["ours_rows2"]
    prefill = two["prefill_seconds"]["median"]
    prefill_gflop = ours["prefill_flops_rows2"] / 1e9
    read, bf16 = machine_probe["read_bandwidth"]["median"], machine_probe["gemm_bf16"]["median"]
    peers = (PEER, "bitsandbytes_peft_rows1")
    pair_step = sum(paths[k]["decode_step_seconds"]["median"] for k in peers)
    ours_speed = two["decode_tokens_per_second_per_side"]["median"]
    int16 = raw["ours_int16"]["step_bytes"], paths["ours_int16_rows2"]
    return {
        **decode_bandwidth(ours["step_bytes"], two, read),
        **decode_bandwidth(*int16, read, prefix="int16_"),
        "prefill_TFLOP": exact(prefill_gflop / 1e3, "TFLOP", of="2 rows"),
        "prefill_GFLOPs": exact(prefill_gflop / prefill, "GFLOP/s"),
        "prefill_peak_fraction": exact(prefill_gflop / prefill / bf16, "x", of="the bf16 GEMM"),
        "bnb_side_by_side_tokens_per_second": exact(
            1 / pair_step, "tokens/s", of="1 / (bitsandbytes step + bitsandbytes + peft step)"
        ),
        "ours_rows2_vs_bnb_side_by_side": exact(
            ours_speed * pair_step, "x", of="ours 2 rows / bitsandbytes side by side, tokens/s"
        ),
    }


def summarize(raw: dict, common: dict, log, machine_probe: dict) -> dict:
    """Figures from the children's raw samples, ratios against bitsandbytes' single stream, and
    the fractions of the machine probes."""
    paths = path_figures(raw)
    servers = {k: server_figures(raw[k], label, flags) for k, (flags, label) in SERVERS.items()}
    res = {
        "settings": {k: v for k, v in common.items() if k != "model_dir"},
        "raw": raw,
        "paths": paths,
        **servers,
        "ratios": ratios_to_peer(paths, servers),
        "derived": derived_figures(raw, paths, machine_probe),
        "machine": machine_probe,
    }
    speed = {k: p["decode_tokens_per_second_per_side"]["median"] for k, p in paths.items()}
    rss = {k: p["peak_rss_GB"]["median"] for k, p in (*paths.items(), *servers.items())}
    log(
        f"  tokens/s per side: ours 2 rows {speed['ours_rows2']:.2f}, int16 2 rows "
        f"{speed['ours_int16_rows2']:.2f}, bitsandbytes 1 row {speed[PEER]:.2f}; peak RSS GB: "
        f"ours {rss['ours_rows2']:.2f}, int16 {rss['ours_int16_rows2']:.2f}, server "
        f"{rss['server']:.2f}, server --int16 {rss['server_int16']:.2f}"
    )
    return res


if __name__ == "__main__":
    child_main(child)
