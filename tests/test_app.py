"""The demo, end to end: `python -m app` in a subprocess on a free loopback port, called through
gradio_client and driven in headless Chromium; its greedy answers must equal `generate`'s.

One server (module scope) serves every test here. The run directory is faked in seconds: the
tiny Phi saved as base/, a LoRA adapter with random non-zero B (so base and tuned differ) saved
in peft's format, config.yaml and summary.json; no training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from app.browser import BrowserMissing, chromium_path, compare_in_browser, open_demo, serve
from grpo.config import GRPOConfig
from grpo.policy import load_model
from grpo.rollout import generate_rollouts
from grpo.tasks.arithmetic import arithmetic_task
from grpo.tiny.build import build_tiny_phi, save_tiny_phi
from qlora import LoRALinear, adapters_disabled, load_adapter, prepare_qlora, save_adapter

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser

MAX_NEW = 8  # tokens per answer in these tests
N_EVAL = 50


def make_run(run: Path) -> Path:
    """A run directory as `make train` leaves it, without the training."""
    save_tiny_phi(run / "base", seed=0)
    model, _ = load_model(run / "base")
    prepare_qlora(model, r=8, alpha=16, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=g))
    save_adapter(model, run / "adapter", str(run / "base"))
    GRPOConfig(model="tiny", output_dir=str(run), n_eval=N_EVAL, max_new_tokens=MAX_NEW).save_yaml(
        run / "config.yaml"
    )
    summary = {"accuracy_before": 0.1, "accuracy_after": 0.4, "n_eval": N_EVAL, "grpo_steps": 3}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("demo") / "run")


@pytest.fixture(scope="module")
def server(run_dir):
    # --concurrency 2: two requests really run in two threads, so the exact-match tests also
    # check that one request's adapters_disabled never leaks into the other's.
    with serve(["--run-dir", str(run_dir), "--concurrency", "2"], timeout_s=120) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


@pytest.fixture(scope="module")
def direct(run_dir):
    """prompt -> (base, tuned) greedy completions computed here with `generate`: the same
    loader, NF4 quantization and adapter as the server, base under adapters_disabled."""
    model, tokenizer = load_model(run_dir / "base")
    load_adapter(model, run_dir / "adapter", quantize=True)
    model.eval()

    def greedy(prompt: str, max_new_tokens: int = MAX_NEW) -> tuple[str, str]:
        def one():
            return generate_rollouts(
                model, tokenizer, [prompt], max_new_tokens=max_new_tokens, do_sample=False
            ).completions[0]

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the server: 20x faster for the tiny model on a busy box
        try:
            with adapters_disabled(model):
                base = one()
            return base, one()
        finally:
            torch.set_num_threads(threads)

    return greedy


def eval_prompts(n: int) -> list[str]:
    return [r["prompt"] for r in arithmetic_task(seed=0, n_eval=N_EVAL).eval[:n]]


def compare_all(client, prompt: str, max_new_tokens: int = MAX_NEW) -> tuple[str, str, str, str]:
    """(base, tuned, base speed line, tuned speed line) from the `/compare` API."""
    return tuple(client.predict(prompt, max_new_tokens, 1.0, 1.0, True, api_name="/compare"))


def compare(client, prompt: str, max_new_tokens: int = MAX_NEW) -> tuple[str, str]:
    return compare_all(client, prompt, max_new_tokens)[:2]


SPEED_LINE = re.compile(r"^(\d+) tokens? · first after \d+\.\d\d s( · \d+\.\d tokens/s)?$")


# --- the API -------------------------------------------------------------------------------------


def test_compare_api_greedy_equals_generate(client, direct):
    for prompt in [eval_prompts(1)[0], "Hello, tiny Phi!"]:
        expected = direct(prompt)
        assert all(expected), f"pick another prompt: a direct answer is empty {expected}"
        assert expected[0] != expected[1], "the fake adapter should change the greedy answer"
        assert compare(client, prompt) == expected, prompt


def test_each_side_reports_its_speed(client, direct):
    prompt = eval_prompts(1)[0]
    *_, base_speed, tuned_speed = compare_all(client, prompt)
    for line in (base_speed, tuned_speed):
        match = SPEED_LINE.match(line)
        assert match, line
        assert 1 <= int(match.group(1)) <= MAX_NEW
        assert match.group(2), f"{line}: more than one token, so a tokens/s figure"


def test_eight_concurrent_calls_are_all_answered_exactly(client, direct):
    prompts = eval_prompts(8)
    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(compare, client, p) for p in prompts]
        results = [job.result(timeout=120) for job in jobs]
    assert results == [direct(p) for p in prompts]


def test_bad_input_is_answered_not_raised(client, direct):
    assert compare(client, "   ") == ("", "")  # the UI shows a notice instead
    # Longer than the 256-token context: the prompt's last 256 - MAX_NEW tokens are used (the
    # tiny tokenizer is one token per character).
    long_prompt = "1+2=3\n" * 60
    assert compare(client, long_prompt) == direct(long_prompt[-(256 - MAX_NEW) :])
    # max_new_tokens above the slider's range is refused by the slider, not answered
    with pytest.raises(Exception, match="(?i)max"):
        compare(client, "1+1=", max_new_tokens=10_000)


# --- the browser ---------------------------------------------------------------------------------


def require_chromium() -> None:
    """Fail, never skip: the browser test is part of `make test`, which installs chromium."""
    try:
        chromium_path()
    except BrowserMissing as err:
        pytest.fail(str(err))


def test_browser_shows_both_answers_and_rewards(server, direct, tmp_path):
    require_chromium()
    prompt = eval_prompts(1)[0]
    shot = tmp_path / "demo.png"
    shown = compare_in_browser(server, prompt, shot)
    assert shown["base"] and shown["tuned"], shown
    assert (shown["base"], shown["tuned"]) == direct(prompt)
    for side in ("base_reward", "tuned_reward"):  # the run's rewards: correctness + digits
        assert "correct:" in shown[side] and "digits = " in shown[side], shown[side]
        assert "format" not in shown[side]  # the arithmetic task has no answer format
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_browser_empty_prompt_gets_a_notice(server):
    require_chromium()
    with open_demo(server) as page:
        assert "Model and run" in page.page.content()
        shown = page.submit("")
    assert shown["notice"].startswith("Type a prompt")
    assert shown["base"] == shown["tuned"] == ""


def test_browser_explorer_tab_runs_one_step(server, tmp_path):
    require_chromium()
    prompt = eval_prompts(1)[0]
    with open_demo(server) as page:
        shown = page.explore(prompt, group_size=4)
        page.screenshot(tmp_path / "explorer.png")
        too_many = page.explore(prompt, group_size=20)
        empty = page.explore("", group_size=4)
        assert page.markdown("notice") == ""  # the other tab is untouched
    assert shown["notice"] == "" and shown["summary"].startswith("G = 4 · reward mean"), shown
    assert len(shown["completions"]) == 4 and len(shown["tokens"]) == 4
    assert all(shown["tokens"]) and all(len(t) <= MAX_NEW for t in shown["tokens"])
    for row in shown["completions"]:  # "#", text, correctness, digits, reward, A, change
        assert re.search(r"[+-]\d\.\d{3}\s+[+-]\d\.\d{3}$", row), row
    assert sorted(shown["downloads"]) == ["explorer-step.json", "explorer-tokens.csv"]
    assert "G = 20 is not a whole number in 2..16" in too_many["notice"]
    assert too_many["completions"] == [] and too_many["summary"] == ""
    assert empty["notice"].startswith("the prompt is empty")
    assert (tmp_path / "explorer.png").stat().st_size > 10_000


def test_explorer_api(client):
    prompt = eval_prompts(1)[0]
    args = (1.0, 0.04, 0.2, 0.2, "grpo", 0)
    notice, summary, table, tokens, files = client.predict(
        prompt, "", 3, *args, api_name="/explore"
    )
    assert notice == "" and summary.startswith("G = 3 · ") and table.count("<tr>") == 4
    assert sorted(Path(f).name for f in files) == ["explorer-step.json", "explorer-tokens.csv"]
    notice, *rest = client.predict(prompt, "", 1, *args, api_name="/explore")
    assert notice.startswith("G = 1 is not") and rest[:3] == ["", "", ""]


# --- the CLI's errors ----------------------------------------------------------------------------


def test_cli_errors_are_one_line_and_exit_2(run_dir, tmp_path):
    no_adapter = tmp_path / "no-adapter-run"
    no_adapter.mkdir()
    shutil.copy(run_dir / "config.yaml", no_adapter / "config.yaml")
    other, _ = build_tiny_phi(seed=0, hidden_size=64, intermediate_size=256)
    mismatched = save_adapter(
        prepare_qlora(other, r=8, alpha=16), tmp_path / "other-adapter", "a 64-wide tiny Phi"
    )
    cases = {  # argv -> text the error must contain (the path, and how to fix it)
        ("--run-dir", str(no_adapter)): [str(no_adapter / "adapter"), "make train"],
        ("--run-dir", str(run_dir), "--adapter", str(mismatched)): [str(mismatched), "fix:"],
        ("--model", str(tmp_path / "nope"), "--adapter", str(run_dir / "adapter")): [
            str(tmp_path / "nope"),
            "save_pretrained",
        ],
        ("--run-dir", str(tmp_path / "nothing")): [str(tmp_path / "nothing"), "make train"],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {
        argv: subprocess.Popen(
            [sys.executable, "-m", "app", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in cases
    }
    for argv, needles in cases.items():
        _, stderr = procs[argv].communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert procs[argv].returncode == 2, (argv, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, stderr)
        for needle in needles:
            assert needle in lines[0], (argv, needle, lines[0])


# --- pieces --------------------------------------------------------------------------------------


def breakdown_demo(task, cfg: GRPOConfig):
    """A Demo with what `reward_breakdown` reads, and no model."""
    from types import SimpleNamespace

    from app.serving import Demo, run_rewards
    from grpo.tiny.build import build_char_tokenizer

    fns, weights = run_rewards(cfg, task)
    answers = {r["prompt"]: r["answer"] for r in task.train + task.eval}
    generator = SimpleNamespace(tokenizer=build_char_tokenizer())
    return Demo(generator, None, {}, [], answers, fns, weights, task)


def test_breakdown_shows_every_reward_of_the_run_and_no_format_without_one():
    from app.serving import reward_breakdown

    task = arithmetic_task(seed=0, n_eval=N_EVAL)
    prompt, gold = task.eval[0]["prompt"], task.eval[0]["answer"]  # "30+03=", "+033"
    demo = breakdown_demo(task, GRPOConfig(reward_funcs=["correctness", "digits"]))
    assert reward_breakdown(demo, prompt, "+034") == (
        f"correct: **no** (gold {gold}) · correctness = 0 · digits = 0.667 · "
        "reward 1·correctness + 1·digits = **0.667**"
    )
    assert reward_breakdown(demo, prompt, "+033").endswith("= **2**")
    assert reward_breakdown(demo, "1+1=", "2").startswith("_No gold answer")


def test_breakdown_of_a_task_with_an_answer_format(tmp_path, monkeypatch):
    from app.serving import reward_breakdown
    from grpo.tasks import Task
    from grpo.tasks.answers import is_correct
    from grpo.tasks.gsm8k import REWARDS

    (tmp_path / "demo_rewards.py").write_text(
        "def shout(prompts, completions, **columns):\n"
        "    return [float(c.isupper()) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    records = [{"prompt": "Q: 6*7?", "answer": "42"}]
    task = Task("gsm8k", records, records, is_correct, REWARDS, answer_tags=True)
    cfg = GRPOConfig(
        reward_funcs=["correctness", "format", "overlong", "demo_rewards:shout"],
        reward_weights=[1.0, 0.2, 1.0, 0.5],
        max_new_tokens=24,
        overlong_cache=8,
    )
    demo = breakdown_demo(task, cfg)
    # 22 characters, one token each: 6 tokens into the 8-token soft window -> -6/8
    line = reward_breakdown(demo, "Q: 6*7?", "<answer>42</answer> ok")
    assert line == (
        "correct: **yes** (gold 42) · format: **yes** · correctness = 1 · format = 1 · "
        "overlong = -0.75 · demo_rewards:shout = 0 · "
        "reward 1·correctness + 0.2·format + 1·overlong + 0.5·demo_rewards:shout = **0.45**"
    )
    assert "format: **no**" in reward_breakdown(demo, "Q: 6*7?", "42")


# --- the int16 switch ----------------------------------------------------------------------------


def test_demo_decodes_exact_unless_int16_is_asked_for(run_dir):
    from app.serving import load_demo
    from app.spec import resolve_spec
    from qlora import int16_decode

    demo = load_demo(resolve_spec(str(run_dir), int16=True))
    head = demo.generator.base_model.get_output_embeddings()
    assert int16_decode.enabled() and demo.info["decode"].startswith("int16 (")
    assert isinstance(head, int16_decode.GemvLinear)
    weights = [m.qweight for m in demo.generator.base_model.modules() if hasattr(m, "qweight")]
    served = [q for q in weights if isinstance(q, int16_decode.RepackedNF4Weight)]
    # every NF4 weight the int16 path takes is held in its layout only
    assert served and len(served) == sum(int16_decode.repack_reason(q) is None for q in weights)
    demo = load_demo(resolve_spec(str(run_dir)))
    assert not int16_decode.enabled() and demo.info["decode"] == "exact"
