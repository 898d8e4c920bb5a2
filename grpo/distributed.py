"""torch.distributed in the few places GRPO needs it (launched by `torchrun`; no-ops alone).

What has to be global for a multi-process run to equal a one-process run:
- groups: each rank generates whole groups for its share of the step's prompts, so the G
  completions of a prompt never straddle ranks;
- rewards: gathered before the advantages, so scale_rewards="batch" sees the whole batch;
- gradients: DDP all-reduces (averages) the LoRA gradients; the "dapo" loss is multiplied by the
  world size to undo that average, since it already divides by the global token count;
- num_items_in_batch ("dapo"): the real tokens of all ranks, all-reduced.
Rank 0 alone writes logs, samples, plots and checkpoints; every rank resumes from the same one.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist

from grpo.config import ConfigError


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigError(
                f"LOCAL_RANK={local_rank}: this node sees {visible} CUDA device(s), one per process"
                f" is needed; start torchrun with --nproc-per-node={visible}, or pass --device cpu"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return True


def all_reduce_sum(value: float | int, device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of every rank along dim 0, in rank order."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def gather_lists(items: list) -> list[list]:
    """Every rank's list, in rank order (small Python objects, e.g. evaluation completions)."""
    if not dist.is_initialized():
        return [items]
    out: list = [None] * world_size()
    dist.all_gather_object(out, items)
    return out


def cpu_threads_per_rank(requested: int) -> int:
    """Torch threads for one CPU process: `requested` (0: one per core), capped at this rank's
    share of the cores, cores // LOCAL_WORLD_SIZE (>= 1). More OpenMP threads than cores across
    the ranks makes every parallel region wait on a thread the OS has descheduled, all the more
    when other jobs share the cores.

    >>> cpu_threads_per_rank(8) <= max(1, len(os.sched_getaffinity(0)))
    True
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return share if requested <= 0 else min(requested, share)


def set_torch_threads(device: torch.device, requested: int) -> None:
    """torch.set_num_threads(requested) (0: torch's default), on CPU capped by
    cpu_threads_per_rank; under torchrun on CPU the cap applies even to 0."""
    if device.type == "cpu" and (requested > 0 or world_size() > 1):
        torch.set_num_threads(cpu_threads_per_rank(requested))
    elif device.type != "cpu" and requested > 0:
        torch.set_num_threads(requested)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group. Call it once the DDP-wrapped model is gone: DDP's reducer holds
    the group, and a gloo group freed through the reducer is destroyed with the GIL held, while
    a gloo worker thread may be freeing its last collective's tensors, which needs the GIL: the
    rank never exits. gc.collect() first frees a model that only reference cycles keep alive;
    the group's last owner is then its Python handle, whose destructor releases the GIL."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def setup(device: torch.device, prompts_per_step: int) -> torch.device:
    """Join torchrun's process group (if any) and return this process's device; every rank must
    get whole groups, so prompts_per_step has to divide evenly among the processes."""
    init_from_env(device.type)
    if prompts_per_step % world_size():
        raise ConfigError(
            f"prompts_per_step={prompts_per_step} must be a multiple of the {world_size()} "
            "processes, so no group is split across ranks"
        )
    if device.type == "cuda" and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel when there are several processes, else itself."""
    if world_size() <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # NF4 codes are buffers that never change: no need to broadcast them every forward.
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
