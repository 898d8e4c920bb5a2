"""Which linear layers get LoRA: names by architecture, peft's `all-linear`, and `auto`.

    PHI_TARGETS     q_proj, k_proj, v_proj, dense, fc1, fc2          every linear of a Phi block
    LLAMA_TARGETS   q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj   (Llama, SmolLM2)
    "all-linear"    every linear layer except the output head (peft's rule)
    "auto"          the table's names for the model's architecture (config.model_type)

`expand_targets` turns a target list that may hold the two keywords into plain names; the callers
check those names against the model (`qlora.model.find_target_linears`: a name that matches no
layer is one line listing the model's linear layer names).
"""

from __future__ import annotations

PHI_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARCHITECTURE_TARGETS = {"phi": PHI_TARGETS, "llama": LLAMA_TARGETS}
ALL_LINEAR = "all-linear"
AUTO = "auto"
KEYWORDS = (ALL_LINEAR, AUTO)


def matches_target(name: str, target: str) -> bool:
    """peft's rule for a list of targets: the full module path or its dotted suffix.

    >>> matches_target("layers.0.self_attn.q_proj", "q_proj"), matches_target("xq_proj", "q_proj")
    (True, False)
    """
    return name == target or name.endswith("." + target)


def leaf_names(paths) -> list[str]:
    """The distinct last components of module paths, sorted."""
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def expand_targets(
    targets, linear_paths: list[str], model_type: str | None = None, output_head: str = "lm_head"
) -> tuple[str, ...]:
    """`targets` with "all-linear" and "auto" replaced by layer names, in order, without repeats.
    Other names pass through unchecked.

    `linear_paths`: module paths of the model's linear layers; `output_head`: the output head's
    path, never part of "all-linear" (peft leaves it out: it is tied to the embeddings in many
    models and is the largest matrix). ValueError in one line when "auto" meets an architecture
    without a table.

    >>> paths = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"]
    >>> expand_targets(["all-linear"], paths)
    ('q_proj', 'up_proj')
    >>> expand_targets(["auto", "lm_head"], paths, "llama")[-2:]
    ('down_proj', 'lm_head')
    >>> try:
    ...     expand_targets(["auto"], paths, "gpt2")
    ... except ValueError as err:
    ...     print(str(err)[:60])
    LoRA target 'auto': no known targets for architecture 'gpt2'

    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    names: list[str] = []
    for target in targets:
        if target == ALL_LINEAR:
            names += leaf_names(p for p in linear_paths if p != output_head)
        elif target == AUTO:
            if model_type not in ARCHITECTURE_TARGETS:
                raise ValueError(
                    f"LoRA target 'auto': no known targets for architecture {model_type!r} (known: "
                    f"{', '.join(ARCHITECTURE_TARGETS)}); fix: name them (its linear layers are "
                    f"{', '.join(leaf_names(linear_paths))}) or use all-linear"
                )
            names += ARCHITECTURE_TARGETS[model_type]
        else:
            names.append(target)
    return tuple(dict.fromkeys(names))
