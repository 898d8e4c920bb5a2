"""The embedded tiny model of the default run, prepared before GRPO sees it: `build` (the tiny Phi
and its character tokenizer), `warmup` (its supervised warm-up base, cached in <output_dir>/base)
and `warmup_curve` (held-out accuracy against warm-up steps). Nothing of the GRPO algorithm
imports this package; the CLI (`grpo.train`) prepares the base before it builds the trainer."""
