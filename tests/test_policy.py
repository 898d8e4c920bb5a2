import os
import subprocess
import sys

import pytest
import torch

from grpo.cli import check_run
from grpo.policy import ModelLoadError, load_model, resolve_dtype


def test_load_local_dir_sets_pad_and_dtype(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_the_loader_never_asks_the_hub_for_kernels(tiny_model_dir, monkeypatch):
    """An offline machine with the `kernels` package and a GPU failed inside from_pretrained."""
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(tiny_model_dir), "float32")
    assert seen["use_kernels"] is False and seen["local_files_only"] is True


def test_missing_local_path_names_model_and_fix(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model.*no config.json.*save_pretrained"):
        load_model(missing)


def test_unreachable_hub_id_names_model_and_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model("nobody-here/not-a-model-xyz")
    msg = str(err.value)
    assert "nobody-here/not-a-model-xyz" in msg
    assert "huggingface-cli download nobody-here/not-a-model-xyz" in msg
    assert "\n" not in msg


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype='int8'"):
        resolve_dtype("int8")


@pytest.mark.slow
def test_cli_turns_missing_model_into_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo.train",
            "--model",
            "nobody-here/not-a-model-xyz",
            "--task",
            "arithmetic",
            "--output_dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and "huggingface-cli download" in err_lines[0]
    assert "Traceback" not in proc.stderr


def test_output_head_gets_a_contiguous_input(tiny_model_dir):
    """logits_to_keep hands lm_head a strided slice; the loader's pre-hook makes it contiguous,
    so torch folds it into one matmul instead of copying the weight once per row."""
    model, _ = load_model(tiny_model_dir)
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(torch.randint(4, 90, (3, 9)), logits_to_keep=2)
    assert seen == [True]


def policy(model_dir, tmp_path, **overrides):
    from grpo.config import GRPOConfig
    from grpo.policy import build_policy

    cfg = GRPOConfig(
        model=str(model_dir), output_dir=str(tmp_path), lora_r=4, lora_alpha=8.0, **overrides
    )
    torch.manual_seed(0)
    return build_policy(check_run(cfg), torch.device("cpu"))


def test_build_policy_quantizes_while_loading_exactly_as_after(tiny_model_dir, tmp_path):
    from qlora import NF4Linear, prepare_qlora

    model, _, reference = policy(tiny_model_dir, tmp_path)  # the streaming NF4 loader
    targets = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
    assert reference is None
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 4 * len(targets)
    torch.manual_seed(0)
    dense, _ = load_model(tiny_model_dir)  # the whole model in float32 first, then NF4
    prepare_qlora(dense, target_modules=targets, r=4, alpha=8.0, dropout=0.0, quantize=True)
    a, b = model.state_dict(), dense.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tmp_path):
    from grpo.logprobs import completion_logps
    from grpo.rollout import generate_rollouts

    grads = []
    for checkpointing in (False, True):
        model, tokenizer, _ = policy(tiny_model_dir, tmp_path, gradient_checkpointing=checkpointing)
        assert model.is_activation_checkpointing == checkpointing
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)  # B = 0 would leave every lora_A gradient 0
        torch.manual_seed(1)
        ro = generate_rollouts(model, tokenizer, ["12+34=", "56-78="] * 2, max_new_tokens=4)
        model.train()
        # the full forward both times (a checkpointed model never shares prompt passes)
        completion_logps(model, ro, 1.0, share_prompts=False).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 48
    for name in grads[0]:
        assert grads[0][name].abs().max() > 0, name
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_only_a_large_model_on_cpu_hands_memory_back_each_step(monkeypatch):
    import grpo.policy
    from grpo.policy import release_memory_each_step

    calls = []
    monkeypatch.setattr(grpo.policy, "return_large_frees_to_os", lambda: calls.append(1) or True)
    small = torch.nn.Linear(10, 10)  # 110 parameters
    assert not release_memory_each_step(small, torch.device("cpu")) and calls == []
    monkeypatch.setattr(grpo.policy, "SMALL_MODEL_PARAMS", 110)
    assert release_memory_each_step(small, torch.device("cpu")) and calls == [1]
    assert not release_memory_each_step(small, torch.device("cuda")) and calls == [1]


def test_fused_gelu_is_phi_s_gelu_new_to_float32_rounding():
    from transformers.activations import GELUTanh, NewGELUActivation

    from grpo.policy import use_fused_gelu
    from grpo.tiny.build import build_tiny_phi

    model, tokenizer = build_tiny_phi(seed=0)
    ids = tokenizer(["47+05=+052", "03-99=-096"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert use_fused_gelu(model) == model.config.num_hidden_layers
        after = model(input_ids=ids).logits
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert sum(isinstance(m, GELUTanh) for m in model.modules()) == model.config.num_hidden_layers
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    x = torch.linspace(-6, 6, 10001, dtype=torch.float64)
    assert (GELUTanh()(x) - NewGELUActivation()(x)).abs().max() < 1e-12  # one formula
