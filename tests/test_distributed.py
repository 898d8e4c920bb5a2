"""torchrun with 2 CPU processes (gloo, loopback) gives the same LoRA step as 1 process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo import distributed as dist
from grpo.cli import check_run
from grpo.config import GRPOConfig
from grpo.train import build_trainer

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1")
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks (gloo) on any machine, a GPU one included
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-base")
    build_trainer(
        check_run(
            GRPOConfig(
                model="tiny",
                output_dir=str(out),
                warmup_sft_steps=150,
                warmup_sft_batch_size=64,
                n_eval=16,
            )
        ),
        log=lambda m: None,
    )
    return out / "base"


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_two_processes_equal_one(tmp_path, base_dir, loss_type):
    results = {}
    for nproc in (1, 2):
        run = tmp_path / f"run{nproc}"
        run.mkdir()
        shutil.copytree(base_dir, run / "base")
        out = tmp_path / f"lora{nproc}.safetensors"
        if nproc == 1:
            subprocess.run(
                [sys.executable, str(WORKER), str(run), loss_type, str(out)],
                check=True,
                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                capture_output=True,
                timeout=300,
            )
        else:
            torchrun(2, str(WORKER), str(run), loss_type, str(out))
        results[nproc] = load_file(out)
    one, two = results[1], results[2]
    assert one.keys() == two.keys() and any(k.startswith("grad.") for k in one)
    for k in one:  # the gradients the optimizer saw, and the LoRA weights after the step
        # One process shares prompt passes, DDP does not: float32 rounding apart. Adam's first
        # step moves each weight by ~lr * g / (|g| + eps): where g is near eps, a rounding change
        # in g moves the weight by up to a few 1e-3 lr (lr = 1e-2 here).
        atol = 1e-6 if k.startswith("grad.") else 5e-5
        torch.testing.assert_close(
            one[k], two[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}"
        )
        assert one[k].abs().max() > 1e-4, k  # every LoRA matrix and gradient is live


@pytest.mark.parametrize(
    ("requested", "cores", "local_world", "expected"),
    [(2, 2, 2, 1), (0, 2, 2, 1), (2, 2, 1, 2), (0, 16, 4, 4), (3, 16, 4, 3), (8, 3, 4, 1)],
)
def test_cpu_threads_per_rank_never_oversubscribes(
    monkeypatch, requested, cores, local_world, expected
):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert dist.cpu_threads_per_rank(requested) == expected


def test_set_torch_threads_applies_the_cap_on_cpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    dist.set_torch_threads(torch.device("cpu"), 8)  # capped at the 2 cores
    dist.set_torch_threads(torch.device("cpu"), 0)  # one process, 0: torch's default, untouched
    dist.set_torch_threads(torch.device("cuda"), 8)  # host threads of a GPU run: as asked
    dist.set_torch_threads(torch.device("cuda"), 0)
    assert calls == [2, 8]


def test_torchrun_end_to_end_writes_one_checkpoint(tmp_path, base_dir):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(base_dir, run / "base")
    cfg = GRPOConfig(
        model="tiny",
        output_dir=str(run),
        max_steps=3,
        save_every=0,
        prompts_per_step=4,
        num_generations=4,
        micro_batch_size=8,
        max_new_tokens=5,
        n_eval=16,
        warmup_sft_steps=150,  # as the copied base was built (else it is rebuilt)
        warmup_sft_batch_size=64,
        lora_r=4,
        lora_alpha=8.0,
    )
    cfg.save_yaml(tmp_path / "c.yaml")
    proc = torchrun(2, "-m", "grpo.train", "--config", str(tmp_path / "c.yaml"))
    share = max(1, len(os.sched_getaffinity(0)) // 2)  # torch_threads=2 capped at the cores
    assert f"2 process(es) x {min(2, share)} torch thread(s)" in proc.stdout
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000003"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # rank 0 alone logs


def test_more_cuda_ranks_than_devices_is_one_line(monkeypatch):
    """torchrun with 2 processes on a 1-GPU node: one line with the fix, not a CUDA error."""
    from grpo.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1: .* 1 CUDA device.*--nproc-per-node=1"):
        dist.init_from_env("cuda")
