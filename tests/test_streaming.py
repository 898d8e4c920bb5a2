"""app/streaming.py: both answers in one batch equal two separate `generate` calls, exactly."""

from __future__ import annotations

import pytest
import torch

from app.streaming import PairGenerator, Sampling, Side
from grpo.tiny.build import build_tiny_phi
from qlora import LoRALinear, adapters_disabled, merge_adapters, prepare_qlora

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser

PROMPTS = ["47+05=", "Hello, tiny Phi!", "3-99="]


@pytest.fixture(scope="module")
def adapted():
    model, tokenizer = build_tiny_phi(seed=0)
    prepare_qlora(model, r=8, alpha=16, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=g))
    return model.eval().requires_grad_(False), tokenizer


def generate(model, tokenizer, prompt: str, max_new_tokens: int, eos: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
    tokens = out[0, ids.shape[1] :].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def stream_to_end(pair: PairGenerator, prompt: str, max_new_tokens: int) -> tuple[Side, Side]:
    prepared = pair.prepare(prompt, max_new_tokens)
    steps = list(pair.stream(prepared, Sampling(prepared.max_new_tokens)))
    assert steps, "at least one step"
    return steps[-1]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_one_batch_equals_two_generate_calls(adapted, prompt):
    model, tokenizer = adapted
    pair = PairGenerator(model, model, tokenizer, max_new_tokens_cap=64)
    assert pair.one_pass
    base, tuned = stream_to_end(pair, prompt, 12)
    eos = tokenizer.eos_token_id
    with adapters_disabled(model):
        expected_base = generate(model, tokenizer, prompt, 12, eos)
    assert base.ids == expected_base
    assert tuned.ids == generate(model, tokenizer, prompt, 12, eos)
    assert base.ids != tuned.ids, "the adapter should change the greedy answer"


class WithEos:
    """The tokenizer, with another token as its EOS."""

    def __init__(self, tokenizer, eos: int):
        self.tokenizer, self.eos_token_id = tokenizer, eos

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


NEVER = 10**6  # an EOS id no model here can produce


def test_one_side_stops_at_eos_the_other_goes_on(adapted):
    """Make the base's 4th greedy token the EOS: the base stops there, the tuned side does not,
    and both still equal `generate` with that EOS."""
    model, tokenizer = adapted
    prompt = PROMPTS[0]
    with adapters_disabled(model):
        free = generate(model, tokenizer, prompt, 10, eos=NEVER)
    tuned_free = generate(model, tokenizer, prompt, 10, eos=NEVER)
    eos = free[3]
    assert eos not in free[:3] and eos not in tuned_free, "pick another prompt or position"
    pair = PairGenerator(model, model, WithEos(tokenizer, eos), 64)
    base, tuned = stream_to_end(pair, prompt, 10)
    assert base.ids == free[:3] and base.eos and base.tokens == 4
    assert tuned.ids == tuned_free and not tuned.eos and tuned.tokens == 10
    assert base.seconds <= tuned.seconds


def test_merged_copy_decodes_beside_the_base(adapted):
    model, tokenizer = adapted
    merged = merge_adapters(model).eval()
    pair = PairGenerator(model, merged, tokenizer, max_new_tokens_cap=64)
    assert not pair.one_pass
    base, tuned = stream_to_end(pair, PROMPTS[1], 8)
    eos = tokenizer.eos_token_id
    with adapters_disabled(model):
        assert base.ids == generate(model, tokenizer, PROMPTS[1], 8, eos)
    assert tuned.ids == generate(merged, tokenizer, PROMPTS[1], 8, eos)


def test_sampling_is_reproducible_with_a_generator(adapted):
    model, tokenizer = adapted
    pair = PairGenerator(model, model, tokenizer, max_new_tokens_cap=64)
    prepared = pair.prepare(PROMPTS[2], 8)
    sampling = Sampling(8, greedy=False, temperature=1.5, top_p=0.9)

    def run():
        g = torch.Generator().manual_seed(7)
        base, tuned = list(pair.stream(prepared, sampling, g))[-1]
        return base.ids, tuned.ids

    assert run() == run()


def test_speed_line_counts_the_eos_and_times_the_decode():
    side = Side()
    for i, token in enumerate([5, 6, 7, 2]):
        side.add(token, eos_token_id=2, elapsed=1.0 + 0.5 * i)
    assert side.ids == [5, 6, 7] and side.done and side.eos and side.tokens == 4
    assert side.tokens_per_second() == pytest.approx(3 / 1.5)
    assert side.speed_line() == "4 tokens · first after 1.00 s · 2.0 tokens/s"
    one = Side()
    one.add(2, eos_token_id=2, elapsed=0.25)
    assert one.speed_line() == "1 token · first after 0.25 s"


def test_steps_run_on_the_model_thread_and_give_the_same_tokens(adapted):
    """With a ModelThread as the runner (as the server does), every forward pass runs on that one
    thread, none on the caller's, and the answers are the direct path's, token for token."""
    import threading

    from app.worker import ModelThread

    model, tokenizer = adapted
    worker = ModelThread()
    seen = []

    def on_worker(fn, *args):
        seen.append(threading.get_ident())
        return worker.run(fn, *args)

    threaded = PairGenerator(model, model, tokenizer, 64, runner=on_worker)
    direct = PairGenerator(model, model, tokenizer, 64)
    for prompt in PROMPTS:
        got = stream_to_end(threaded, prompt, 10)
        want = stream_to_end(direct, prompt, 10)
        assert [s.ids for s in got] == [s.ids for s in want]
    assert len(seen) >= 10 * len(PROMPTS) // 2
    worker.close()


def test_float32_kv_cache_gives_the_16_bit_cache_s_logits_bit_for_bit(monkeypatch):
    """A bf16 model decoding with app.cpu_attention keeps its cache in float32 (the same 16-bit
    values, never widened again per step): prefill and every decode step give the same logits
    as a bf16 cache, bit for bit; past the size budget the cache stays in the model's dtype."""
    from app import streaming
    from app.cpu_attention import use_cpu_decode_attention

    model, tokenizer = build_tiny_phi(seed=0)
    model = model.to(torch.bfloat16).eval()
    use_cpu_decode_attention(model)
    ids = tokenizer([PROMPTS[1]] * 2, return_tensors="pt", add_special_tokens=False)["input_ids"]
    capacity = ids.shape[1] + 6
    assert streaming.cache_dtype(model, 2, capacity) == torch.float32

    def logits(dtype):
        cache = streaming.preallocated_cache(model, capacity, dtype)
        out, seq, steps = None, ids, []
        with torch.inference_mode():
            for _ in range(6):
                inputs = seq if out is None else seq[:, -1:]
                out = model(input_ids=inputs, cache=cache, use_cache=True, logits_to_keep=1)
                steps.append(out.logits[:, -1].float())
                seq = torch.cat([seq, steps[-1].argmax(-1, keepdim=True)], dim=1)
        assert cache.layers[0].key_buffer.dtype == (dtype or torch.bfloat16)
        return steps

    for ours, theirs in zip(logits(torch.float32), logits(None), strict=True):
        assert torch.equal(ours, theirs)
    monkeypatch.setattr(streaming, "FLOAT32_CACHE_BYTES", 1024)
    assert streaming.cache_dtype(model, 2, capacity) is None
