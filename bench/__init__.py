"""`make bench`: our QLoRA + GRPO pieces against the peers a user would otherwise pick.

run.py             `python -m bench.run`: all four parts -> results.json, results.md, README
layers.py          1. NF4 layer fwd+bwd vs bitsandbytes vs fp32 (timing in qlora/bench.py)
quality.py         2. quantization error, bits/parameter, Phi-2's NF4 footprint
grpo_step.py       3. GRPO step split by phase, NF4/fp32 base x beta 0/0.04
logprob_memory.py  4. selective_log_softmax vs log_softmax().gather() peak memory
measure.py         figures, ratios, peak memory, machine description, child processes
report.py          results.md and the README section between the bench markers
"""
