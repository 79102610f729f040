"""`train.py --objective grpo` end to end (training/grpo_loop.py), on the tiny random model, CPU:

- A run samples, rewards and trains: metrics.jsonl has the reward, its spread, each function's
  mean, the completions' lengths, the share stopped and GRPOLoss's figures; completions.jsonl holds
  the first sampled completions of each generation as text; the evaluation scores the validation
  prompts' greedy answers (val_reward).
- Accumulation: micro_batch_size 2 x grad_accum 1 equals 1 x 2 (the step's prompts are sampled in one
  batch either way, so both train on the same completions): the same loss and adapter.
- --grpo-iterations 2: two updates per generation, the second against pi_old (the ratio moved:
  tokens clipped), on the same completions (the same reward figures).
- --resume after a cut at step 2 equals the uninterrupted run bit for bit (mid-generation, the
  generation itself restored; the next one seeded as the uninterrupted run's).
- torchrun (DDP, gloo, 2 ranks) trains and samples what one process does, a rank with no prompts
  included, and resumes mid-generation; a mid-generation checkpoint of 2 ranks is refused by one.
- bf16 and fp16 autocast, an NF4 base and gradient checkpointing run.
- The demo's defaults, and the settings GRPO does not take, refused with one line.
- A bad reward function (not importable, raising, NaN, the wrong length) ends train.py with one
  line naming it and exit 2, before the model loads, no output directory made.
- The reward rises on a reward easy to increase (+1 per "e" in the completion): over 20 steps its
  mean over the last 3 is more than 4 above that over the first 3.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from test_parallel import assert_same_adapter, cut_at_step_2, run_ok
from test_train import adapter, config, metrics
from training.flags import parse_config
from training.loop import train
from training.checkpoint import CheckpointError
from training.settings import ARITHMETIC, DEMO_PROMPTS_DATA, DEMO_REWARDS, DEMO_VALIDATION, GRPO_DEMO, TrainError

REWARDS = '''
def count_e(prompts, completions, **_):
    return [float(c.count("e")) for c in completions]

def has_answer(prompts, completions, answer, **_):
    return [float(a in c) for c, a in zip(completions, answer)]

def raises(prompts, completions, **_):
    raise RuntimeError("boom")

def nan(prompts, completions, **_):
    return [float("nan")] * len(completions)

def short(prompts, completions, **_):
    return [0.0]
'''


@pytest.fixture
def prompts(tmp_path, monkeypatch):
    """8 prompts (and 2 for validation) with an answer field, and the reward module, in the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grpo_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": f"Name a word with the letter e, number {i}.", "answer": "e"} for i in range(10)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (tmp_path / "prompts_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    return tmp_path / "prompts.jsonl"


def steps(out):
    """metrics.jsonl's step rows (not the evaluation before the first step)."""
    return [m for m in metrics(out) if "loss" in m]


def grpo_config(model_dir, path, out, **kw):
    base = dict(objective="grpo", reward="grpo_rewards:count_e,grpo_rewards:has_answer", reward_weights="1,0.5",
                grpo_group_size=4, max_new_tokens=6, max_seq_len=64, micro_batch_size=2, grad_accum=1,
                lr=2e-2, grpo_beta=0.04)
    return config(model_dir, path, out, **{**base, **kw})


def test_a_run_logs_rewards_completions_and_evaluation(tiny_chat_dir, prompts, tmp_path):
    out = tmp_path / "run"
    train(grpo_config(tiny_chat_dir, prompts, out, max_steps=2, eval_every=2,
                      val_data=str(prompts.with_name("prompts_val.jsonl"))))
    rows = metrics(out)
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and "val_reward" in first and "val_reward_count_e" in first
    for k in ("loss", "reward", "reward_std", "reward_count_e", "reward_has_answer", "completion_length",
              "completion_length_max", "stopped_share", "kl", "clip_fraction", "val_reward"):
        assert k in last, k
    assert 1 <= last["completion_length"] <= last["completion_length_max"] <= 6
    assert last["reward"] == pytest.approx(last["reward_count_e"] + 0.5 * last["reward_has_answer"])
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]  # the first 2 of each generation
    assert all(isinstance(s["completion"], str) and s["prompt"].startswith("Name a word") for s in samples)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_accumulation_equals_one_batch(tiny_chat_dir, prompts, tmp_path):
    """The same prompts, sampled in one batch either way, trained as 2 x 1 or 1 x 2 micro-batches."""
    big, small = tmp_path / "big", tmp_path / "small"
    train(grpo_config(tiny_chat_dir, prompts, big, max_steps=1, micro_batch_size=2, grad_accum=1))
    train(grpo_config(tiny_chat_dir, prompts, small, max_steps=1, micro_batch_size=1, grad_accum=2))
    b, s = steps(big)[0], steps(small)[0]
    assert b["reward"] == s["reward"] and b["completion_length"] == s["completion_length"]
    assert b["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=1e-7)
    assert b["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4)
    a1, a2 = adapter(big), adapter(small)
    assert all(torch.allclose(a1[k], a2[k], rtol=1e-3, atol=1e-5) for k in a1)


def test_iterations_update_twice_per_generation(tiny_chat_dir, prompts, tmp_path):
    out = tmp_path / "run"
    train(grpo_config(tiny_chat_dir, prompts, out, max_steps=4, grpo_iterations=2, lr=5e-2, grpo_epsilon=0.05))
    rows = steps(out)
    samples = [json.loads(line)["step"] for line in (out / "completions.jsonl").read_text().splitlines()]
    assert samples == [1, 1, 3, 3]  # a generation at steps 1 and 3
    for first, second in (rows[0], rows[1]), (rows[2], rows[3]):
        assert second["reward"] == first["reward"] and second["completion_length"] == first["completion_length"]
        assert first["clip_fraction"] == 0  # on-policy: rho is exactly 1
        assert second["clip_fraction"] > 0  # the first update moved the ratio past the clip


def test_resume_is_exact(tiny_chat_dir, prompts, tmp_path):
    """Cut at step 2 of 4, with 3 iterations per generation: in the middle of the first generation
    (its completions restored), and the second sampled at step 4 from the same seeds."""
    kw = dict(max_steps=4, save_every=2, keep_checkpoints=5, lora_dropout=0.1, grpo_iterations=3)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(grpo_config(tiny_chat_dir, prompts, full, **kw))
    cut_at_step_2(full, cut)
    train(grpo_config(tiny_chat_dir, prompts, cut, resume=True, **kw))
    assert metrics(cut) == [{**m, **{k: metrics(cut)[i][k] for k in ("tokens_per_s", "elapsed_s") if k in m}}
                            for i, m in enumerate(metrics(full))]
    assert (cut / "completions.jsonl").read_text() == (full / "completions.jsonl").read_text()
    a, b = adapter(full), adapter(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_equal_one_process_and_resume(tiny_chat_dir, prompts, tmp_path):
    """GRPO under torchrun (DDP, gloo, 2 ranks): each rank samples its share of a step's prompts,
    each prompt's group from a seed of its own, so the ranks draw the completions one process
    draws and train what it trains. 5 prompts, 4 a step, 3 steps a generation: the second
    generation (step 4) has one prompt, rank 1 none. The figures are of all ranks' completions.
    Cut at step 2 (mid-generation), the ranks resume to the same end; one process refuses that
    checkpoint (its generation was sampled by two)."""
    five = tmp_path / "five.jsonl"
    five.write_text("".join(prompts.read_text().splitlines(True)[:5]))
    kw = dict(max_steps=4, save_every=2, keep_checkpoints=5, grpo_iterations=3, eval_every=4,
              val_data=str(prompts.with_name("prompts_val.jsonl")))
    single, ranks, cut = tmp_path / "single", tmp_path / "ranks", tmp_path / "cut"
    train(grpo_config(tiny_chat_dir, five, single, micro_batch_size=4, **kw))
    run_ok(grpo_config(tiny_chat_dir, five, ranks, micro_batch_size=2, parallel="ddp", **kw), paths=[tmp_path])
    assert_same_adapter(adapter(ranks), adapter(single))
    a, b = metrics(ranks), metrics(single)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3, 4]
    for m, n in zip(a, b):
        assert m.keys() == n.keys()
        for k in ("reward", "reward_std", "reward_count_e", "completion_length", "stopped_share", "val_reward"):
            assert m.get(k) == n.get(k), (k, m, n)  # the same completions, gathered in the same order
        assert m.get("loss", 0) == pytest.approx(n.get("loss", 0), rel=1e-4, abs=1e-6)
    assert (ranks / "completions.jsonl").read_text() == (single / "completions.jsonl").read_text()
    cut_at_step_2(ranks, cut)
    run_ok(grpo_config(tiny_chat_dir, five, cut, micro_batch_size=2, parallel="ddp", resume=True, **kw),
           paths=[tmp_path])
    assert [m["reward"] for m in steps(cut)] == [m["reward"] for m in steps(ranks)]
    assert all(torch.equal(x, y) for x, y in zip(adapter(cut).values(), adapter(ranks).values()))
    cut_at_step_2(ranks, tmp_path / "alone")
    with pytest.raises(CheckpointError, match="sampled by 2 process"):
        train(grpo_config(tiny_chat_dir, five, tmp_path / "alone", micro_batch_size=4, resume=True, **kw))


@pytest.mark.parametrize("flags", [dict(precision="bf16"), dict(precision="fp16"),
                                   dict(quantize="nf4", grad_checkpointing=True)], ids=["bf16", "fp16", "nf4"])
def test_mixed_precision_qlora_and_checkpointing(tiny_chat_dir, prompts, tmp_path, flags):
    """GRPO's sampling and steps under autocast (bf16; fp16 with its GradScaler), and on an NF4 base
    with gradient checkpointing: finite figures and adapter. (That a checkpointed block recomputes
    what it computed is test_lora's and test_offload's, whatever the loss.)"""
    out = tmp_path / "run"
    train(grpo_config(tiny_chat_dir, prompts, out, max_steps=2, **flags))
    rows = steps(out)
    assert len(rows) == 2 and all(math.isfinite(r[k]) for r in rows for k in ("loss", "reward", "kl", "grad_norm"))
    assert all(torch.isfinite(t).all() for t in adapter(out).values())


@pytest.mark.parametrize("reward, says", [
    ("grpo_rewards:missing", "grpo_rewards:missing"), ("no_such_module:f", "no_such_module:f"),
    ("grpo_rewards:raises", "grpo_rewards:raises raised RuntimeError: boom"),
    ("grpo_rewards:nan", "grpo_rewards:nan returned nan"),
    ("grpo_rewards:short", "grpo_rewards:short returned 1 values")])
def test_a_bad_reward_is_one_line_before_training(tiny_chat_dir, prompts, tmp_path, reward, says):
    out = tmp_path / "never"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--objective", "grpo", "--model",
                             str(tiny_chat_dir), "--data", str(prompts), "--reward", reward, "--output-dir", str(out),
                             "--device", "cpu"], capture_output=True, text=True, cwd=prompts.parent)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not out.exists()


def test_the_reward_rises(tiny_chat_dir, prompts, tmp_path):
    """At temperature 0.3: at 1 the random model's next token is spread almost evenly over 49152
    tokens, whose random embeddings share no direction that e-rich ones could be moved along, and
    the reward wanders (whether it rose in 20 steps was a matter of the seed); at 0.3 a few tokens
    per position hold the mass, and GRPO moves it to those with more e's. Measured over --seed 0,
    1, 2: a mean over the first 3 steps of 3.8 to 4.3, over the last 3 of 12 to 18."""
    out = tmp_path / "run"
    train(grpo_config(tiny_chat_dir, prompts, out, reward="grpo_rewards:count_e", reward_weights=None, max_steps=20,
                      grpo_beta=0.0, lr=5e-2, lr_schedule="constant", micro_batch_size=4, temperature=0.3))
    rewards = [m["reward"] for m in metrics(out) if "reward" in m]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 4, rewards


def test_settings_refused_and_demo_defaults(prompts, tmp_path):
    """The demo: examples/pirate.jsonl scored by examples/pirate_rewards.py (found from any
    directory: here the test's) into runs/demo-grpo, with GRPO_DEMO's settings where not given;
    examples/arithmetic.jsonl scored by exact_match; what GRPO does not take is refused with one
    line naming the flag, before any work."""
    cfg = parse_config(["--objective", "grpo", "--max-steps", "5"])
    assert (cfg.reward, Path(cfg.data).name, cfg.output_dir) == (
        DEMO_REWARDS[DEMO_PROMPTS_DATA], "pirate.jsonl", "runs/demo-grpo")
    assert Path(cfg.data).resolve() in DEMO_VALIDATION
    assert cfg.max_steps == 5 and all(getattr(cfg, k) == v for k, v in GRPO_DEMO.items() if k != "max_steps")
    arithmetic = parse_config(["--objective", "grpo", "--data", str(ARITHMETIC)])
    assert arithmetic.reward == "training.rewards:exact_match" and arithmetic.temperature == 1.0
    assert Path(arithmetic.data).resolve() in DEMO_VALIDATION
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    given = ["--objective", "grpo", "--data", str(prompts), "--reward", "grpo_rewards:count_e"]
    for flags, says in ((given[:4], "needs --reward"), (given + ["--pack"], "--pack"),
                        (given + ["--mask", "last"], "--mask last"),
                        (given + ["--max-new-tokens", "64", "--max-seq-len", "64"], "--max-new-tokens 64"),
                        (given + ["--precompute-ref"], "--precompute-ref is for"),
                        (given[:2] + ["--data", str(pairs)] + given[4:], "needs prompt records"),
                        (["--reward", "grpo_rewards:count_e"], "--reward is for --objective grpo"),
                        (given + ["--grpo-group-size", "1"], r"--grpo-group-size 1: must be in \[2, inf\)"),
                        (given + ["--top-p", "0"], r"--top-p 0.0: must be in \(0, 1\]")):
        with pytest.raises(TrainError, match=says):
            parse_config(flags)
