import os
import subprocess
import sys

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' models are tiny and several tests run a server or torchrun workers beside pytest:
# one thread per process avoids oversubscribing 2 cores (inherited by every subprocess).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment above)
from hypothesis import settings  # noqa: E402
from torch import nn  # noqa: E402

from qlora import LoRALinear  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Property tests draw the same examples on every run: CI is reproducible, a failure replays.
settings.register_profile("repo", derandomize=True, deadline=None)
settings.load_profile("repo")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Phi saved with save_pretrained, loadable exactly like microsoft/phi-2."""
    from grpo.tiny.build import save_tiny_phi

    return save_tiny_phi(tmp_path_factory.mktemp("models") / "tiny-phi", seed=0)


def run_cli_bad_input(module: str, *args: str) -> str:
    """Run `python -m module args...`, expect exit 2 with one non-empty stderr line; return it."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(autouse=True)
def _exact_decoding_by_default():
    """The int16 decode path is a process-wide switch (the demo turns it on): every test starts
    and ends with it off, so exactness tests never run after a demo test left it on."""
    from qlora import int16_decode

    int16_decode.set_enabled(False)
    yield
    int16_decode.set_enabled(False)


# --- small builders shared by the qlora layer and model tests -------------------------------------


def linear(in_f=128, out_f=96, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def tokens(seed=0, shape=(2, 12)):
    return torch.randint(4, 90, shape, generator=torch.Generator().manual_seed(seed))


def randomize_lora_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))
