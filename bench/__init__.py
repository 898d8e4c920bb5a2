"""Benchmarks and result renderers. Tooling: nothing in grpo/, qlora/ or app/ imports this package.

run.py                  `make bench` (`python -m bench.run`): the six parts below ->
                        results.json, results.md and the README's Performance blocks
layer_speed.py          1. NF4 layer fwd+bwd vs bitsandbytes vs fp32, and dequantization
quality.py              2. quantization error, bits/parameter, Phi-2's NF4 footprint
grpo_step.py            3. GRPO steps of the tiny default config by phase, NF4/fp32 x beta
logprob_memory.py       4. selective_log_softmax vs log_softmax().gather() peak memory
kernel_speed.py         5. the NF4 CPU kernels (exact, int16) against the machine and the peers
serve.py                6. a Phi-2-sized model served on CPU: ours vs bitsandbytes vs dense bf16
measure.py              figures, ratios, timing, memory, the machine, child processes
report.py               results.md and the README's Performance blocks from results.json
phi2.py                 the random-weight Phi-2 (Phi-2's config, the tiny tokenizer), cached
phi2_scale.py           `make phi2-scale`: GRPO steps of the Phi-2 recipe on the random Phi-2
phi2_gpu.py             the recipe on a GPU: ours against bitsandbytes + peft, and memory caps
int16_quality.py        the int16 decode path against the exact one on SmolLM2-135M-Instruct
results.py              the README's results block of a training run, and the block rewriter
explorer_time.py        seconds of one "Inside one GRPO step" run on a config's model
decode_profile.py       where a 2-row decode step of the demo goes (torch.profiler, part 6's model)
word_problems_report.py a word-problem run's base-vs-tuned figures
"""
