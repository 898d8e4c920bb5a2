"""`make bench` and `make phi2-scale`: our QLoRA + GRPO pieces against the peers a user would
otherwise pick, and the Phi-2 recipe at Phi-2's size. Tooling: nothing in grpo/, qlora/ or app/
imports this package.

run.py             `python -m bench.run`: all six parts -> results.json, results.md, README
layer_speed.py     1. NF4 layer fwd+bwd vs bitsandbytes vs fp32 (timing in qlora_timing.py)
quality.py         2. quantization error, bits/parameter, Phi-2's NF4 footprint
grpo_step.py       3. GRPO step split by phase, NF4/fp32 base x beta 0/0.04
logprob_memory.py  4. selective_log_softmax vs log_softmax().gather() peak memory
kernel_speed.py    5. the NF4 CPU kernels (exact, int8) against decode + GEMM and bitsandbytes
serve.py           6. the demo's decode speed and memory against transformers/peft
int8_quality.py    `python -m bench.int8_quality`: the int8 decode path on SmolLM2-135M
phi2_scale.py      `make phi2-scale`: GRPO steps of the Phi-2 recipe on a random-weight Phi-2
phi2.py            the random-weight Phi-2 both build (Phi-2's config, the tiny tokenizer)
measure.py         figures, ratios, peak memory, machine description, child processes
report.py          results.md and the README section between the bench markers
results.py         `python -m bench.results runs/tiny`: the README's results block of a run
"""
