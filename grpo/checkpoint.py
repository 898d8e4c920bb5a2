"""Checkpoints: everything a killed run needs to continue as if it had never stopped.

    checkpoints/step-000200/
        adapter/                  the LoRA matrices (qlora.save_adapter), or model.safetensors
                                  (the trainable weights, full fine-tuning)
        optimizer.safetensors     AdamW's moments and step counts, and the torch RNG state
        trainer_state.json        the step, AdamW's hyperparameters, the no-signal streak

Nothing is pickled: tensors go to safetensors, the rest to JSON. A checkpoint directory is written
whole in a temporary directory and renamed into place (`qlora.atomic.atomic_dir`), so a kill at any
moment leaves either no step-N or a complete one. The learning rate is a function of the step
alone (`grpo.schedule.learning_rate`), so there is no scheduler state to save.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from grpo import distributed as dist
from grpo.policy import base_path, save_model_dir
from qlora import load_adapter, save_adapter
from qlora.atomic import atomic_dir

STATE_FILE = "trainer_state.json"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def optimizer_state_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW state as flat tensors "state.<param id>.<key>" (safetensors) + hyperparameters
    (JSON): nothing pickled."""
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            tensors[f"state.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """The inverse of `optimizer_state_tensors`."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train, detached on the CPU: name -> tensor."""
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def save_checkpoint(
    directory: Path, model, opt: torch.optim.Optimizer, *, use_lora: bool, base: str, state: dict
) -> Path:
    """Write a whole checkpoint to `directory` atomically; `state` (JSON: at least "step") goes
    to trainer_state.json next to AdamW's hyperparameters."""
    with atomic_dir(directory) as tmp:
        if use_lora:
            save_adapter(model, tmp / "adapter", base)
        else:
            save_file(trainable_state(model), str(tmp / "model.safetensors"))
        tensors, meta = optimizer_state_tensors(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps(meta | state, indent=2))
    return directory


def load_checkpoint(directory: Path, model, opt: torch.optim.Optimizer, *, use_lora: bool) -> dict:
    """Restore the weights, AdamW and the torch RNG from `directory`; returns its state JSON."""
    meta = json.loads((directory / STATE_FILE).read_text())
    if use_lora:
        load_adapter(model, directory / "adapter")
    else:
        weights = load_file(str(directory / "model.safetensors"))
        missing = [n for n in trainable_state(model) if n not in weights]
        if missing:
            raise RuntimeError(
                f"checkpoint {directory} lacks {missing[0]}; it was written by a "
                "different config (use_lora?)"
            )
        model.load_state_dict(weights, strict=False)
    tensors = load_file(str(directory / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    load_optimizer_state(opt, tensors, meta)
    return meta


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoints/step-N in `output_dir`, or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def save_final(output_dir: str | Path, model, tokenizer, *, use_lora: bool, base: str) -> Path:
    """<output_dir>/adapter (LoRA) or <output_dir>/model (full fine-tuning: the model itself)."""
    target = Path(output_dir) / ("adapter" if use_lora else "model")
    if use_lora:
        save_adapter(model, target, base)
    else:
        save_model_dir(model, tokenizer, target)
    return target


def save_trainer(trainer) -> Path:
    """checkpoints/step-N of a `GRPOTrainer` at its current step: rank 0 writes it, every rank
    waits for it."""
    cfg = trainer.cfg
    path = step_dir(cfg.output_dir, trainer.step)
    if dist.is_main():
        state = {"step": trainer.step, "no_signal_streak": trainer.no_signal_streak}
        save_checkpoint(
            path,
            trainer.model,
            trainer.opt,
            use_lora=cfg.use_lora,
            base=base_path(cfg),
            state=state,
        )
    dist.barrier()
    return path


def resume_trainer(trainer, path: Path) -> None:
    """Put a `GRPOTrainer` back where `save_trainer` left it (every rank loads the same one)."""
    meta = load_checkpoint(path, trainer.model, trainer.opt, use_lora=trainer.cfg.use_lora)
    trainer.step = int(meta["step"])
    trainer.no_signal_streak = int(meta.get("no_signal_streak", 0))
