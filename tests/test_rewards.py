"""GRPO's reward functions (training/rewards.py): loading, checking, calling, and the shipped ones.

- exact_match extracts a completion's final answer in order (<answer> tags, \\boxed{}, "####", the
  last number), normalises it and compares numbers as numbers and other text ignoring case;
  format_reward and regex_reward match their pattern; length_penalty is 0, then linear, then -1.
- load_rewards finds the built-ins and a module in the current directory, with weights; every bad
  spec, module, function or weight is a one-line RewardError naming it.
- examples/pirate_rewards.py (the GRPO demo's) scores the style only around an answer, and its
  prompt files ask the sample data's questions.
- score returns the weighted sum and each function's rewards in float64, and refuses what a function
  returns unless it is N finite numbers; check_rewards catches a broken function on the probes.
"""

import math
import sys

import numpy as np
import pytest
import torch

from model.errors import UserError
from training import rewards
from training.rewards import RewardError, Reward, check_rewards, load_rewards, score


# --- the shipped functions -----------------------------------------------------------------------

@pytest.mark.parametrize("text, answer", [
    ("<think>7 + 5 = 12</think><answer>12</answer> and later <answer>13</answer>", "13"),  # the last tag
    ("<answer>1</answer> then \\boxed{2}", "1"),  # tags before boxed
    ("so \\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{3} #### 4", "3"),  # boxed before ####
    ("\\boxed{3 unbalanced #### 4", "4"),  # an unclosed box is no box
    ("2 + 2 = 4\n#### 4\nthanks 7", "4"),  # #### before the last number, its line only
    ("17 - 5 is 12, or 1,234.5 maybe", "1,234.5"),  # thousands separators kept for normalize
    ("10-8", "8"),  # a minus between numbers is no sign
    ("it is -3.", "-3"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer_looks_in_order(text, answer):
    assert rewards.extract_answer(text) == answer


@pytest.mark.parametrize("found, expected, same", [
    ("42", "42", True), ("42.0", "42", True), (" 42. ", "42", True), ("1,234", "1234", True),
    ("1,234.50", "1234.5", True), ("-7", "-7.0", True), ("41", "42", False), ("4.2", "42", False),
    ("Paris", "paris", True), ("Paris.", "PARIS", True), ("Paris", "Rome", False),
    ("12,34", "1234", False),  # not a thousands separator: compared as text
    ("nan", "nan", True),  # not numbers (only digits parse): equal as text, not unequal as floats
    ("42 apples", "42", False),
])
def test_same_answer_normalises_then_compares_numbers_or_text(found, expected, same):
    assert rewards.same_answer(found, expected) is same


def test_exact_match_scores_each_completion_against_its_answer():
    completions = ["The answer is 42.", "<answer>41</answer> no, 42", "\\boxed{42.0}", "I don't know", "",
                   "#### PARIS"]
    answers = ["42", "42", 42, "42", "42", "Paris"]
    assert rewards.exact_match(["q"] * 6, completions, answer=answers, level=[1] * 6) == [1, 0, 1, 0, 0, 1]


def test_exact_match_needs_the_answer_field():
    with pytest.raises(ValueError, match="'answer' field, and the records have none"):
        rewards.exact_match(["q"], ["42"])
    with pytest.raises(ValueError, match=r"the record of completions\[1\] has no 'answer'"):
        rewards.exact_match(["q", "q"], ["42", "42"], answer=["42", None])


def test_format_reward_wants_think_then_answer_and_nothing_else():
    good = ["<think>5 + 7 = 12</think><answer>12</answer>", "<think>a\nb</think>\n\n<answer>\n12\n</answer>"]
    bad = ["<answer>12</answer>", "<think>x</think>", "Sure! <think>x</think><answer>12</answer>",
           "<think>x</think><answer>12</answer> ok?", "<answer>12</answer><think>x</think>", ""]
    assert rewards.format_reward([""] * 8, good + bad) == [1.0] * 2 + [0.0] * 6
    assert rewards.format_reward.__name__ == "format_reward"


def test_regex_reward_makes_a_format_reward():
    ahoy = rewards.regex_reward(r"^Ahoy!.*Fair winds!$", name="ahoy")
    assert ahoy(["q"] * 3, ["Ahoy! 42.\nFair winds!", "42. Fair winds!", "Ahoy! 42."], answer=[1] * 3) == [1, 0, 0]
    assert ahoy.__name__ == "ahoy" and rewards.regex_reward("x").__name__ == "regex_reward"
    assert rewards.regex_reward("Ahoy")(["q"], ["Ahoy! and more"]) == [1.0]  # re.match: from the start only
    with pytest.raises(ValueError, match=r"regex_reward: bad pattern '\(': missing \)"):
        rewards.regex_reward("(")


def test_length_penalty_is_zero_then_linear_then_minus_one():
    t = rewards.TARGET_CHARS
    lengths = [0, t, t + 1, t + t // 4, t + t // 2, 2 * t, 2 * t + 1, 10 * t]
    got = rewards.length_penalty([""] * 8, ["x" * n for n in lengths])
    assert got == [0.0, 0.0, -1 / t, -0.25, -0.5, -1.0, -1.0, -1.0]
    assert all(math.copysign(1, g) == 1 for g in got[:2])  # 0.0, not -0.0


# --- loading -------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def forget_test_modules():
    """Each test imports the modules it wrote, never those an earlier test's directory held."""
    yield
    for name in [m for m in sys.modules if m.startswith(("rewards_mod_", "my_rewards_"))]:
        del sys.modules[name]


def test_load_rewards_finds_the_builtins_with_weights():
    loaded = load_rewards("training.rewards:exact_match, training.rewards:length_penalty", "1, -0.5")
    assert loaded == [Reward("training.rewards:exact_match", rewards.exact_match, 1.0),
                      Reward("training.rewards:length_penalty", rewards.length_penalty, -0.5)]
    assert [r.weight for r in load_rewards("training.rewards:format_reward", None)] == [1.0]


def test_load_rewards_imports_a_module_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_cwd.py").write_text(
        "from training.rewards import regex_reward\n\n"
        "def says_ahoy(prompts, completions, **kwargs):\n"
        "    return [float(c.startswith('Ahoy')) for c in completions]\n\n"
        "ends_well = regex_reward(r'.*Fair winds!$')\n")
    monkeypatch.chdir(tmp_path)
    path = list(sys.path)
    loaded = load_rewards("my_rewards_cwd:says_ahoy,my_rewards_cwd:ends_well", "2,1")
    assert sys.path == path  # the current directory was on it for the import only
    total, per = score(loaded, ["q", "q"], ["Ahoy! Fair winds!", "Fair winds!"], {})
    assert per.tolist() == [[1.0, 0.0], [1.0, 1.0]] and total.tolist() == [3.0, 1.0]


def write_module(tmp_path, monkeypatch, name: str, source: str):
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("spec, weights, message", [
    ("rewards_mod_a", None, r"--reward 'rewards_mod_a': expected module:function, like "),
    ("rewards_mod_a:", None, r"--reward 'rewards_mod_a:': expected module:function"),
    (":f", None, r"--reward ':f': expected module:function"),
    ("rewards_mod_a:ok,", None, r"--reward '': expected module:function"),
    ("rewards_mod_a.py:ok", None, r"--reward rewards_mod_a.py:ok: name the module, not its file \(rewards_mod_a:ok\)"),
    ("no_such_module_zz:f", None, r"--reward no_such_module_zz:f: no module named 'no_such_module_zz' in the "
                                  r"current directory \(.*\) or on the python path"),
    ("rewards_mod_a:missing", None, r"--reward rewards_mod_a:missing: module rewards_mod_a \(.*rewards_mod_a.py\) "
                                    r"has no function 'missing'; it has ok"),
    ("rewards_mod_a:LIMIT", None, r"--reward rewards_mod_a:LIMIT: rewards_mod_a.LIMIT is a int, not a function"),
    ("rewards_mod_syntax:f", None, r"--reward rewards_mod_syntax:f: importing rewards_mod_syntax raised "
                                   r"SyntaxError: .*rewards_mod_syntax.py, line 1"),
    ("rewards_mod_dep:f", None, r"--reward rewards_mod_dep:f: importing rewards_mod_dep raised "
                                r"ModuleNotFoundError: No module named 'not_installed_zz' \(rewards_mod_dep.py:1\)"),
    ("rewards_mod_raises:f", None, r"--reward rewards_mod_raises:f: importing rewards_mod_raises raised "
                                   r"RuntimeError: no GPU here \(rewards_mod_raises.py:1\)"),
    ("rewards_mod_a:ok", "x", r"--reward-weights x: expected numbers like 1,0.5, got 'x'"),
    ("rewards_mod_a:ok", "nan", r"--reward-weights nan: expected numbers like 1,0.5, got 'nan'"),
    ("rewards_mod_a:ok", "1,0.5", r"--reward-weights 1,0.5: 2 weights for 1 reward function \(rewards_mod_a:ok\)"),
    ("rewards_mod_a:ok,rewards_mod_a:ok", "1", r"--reward-weights 1: 1 weights for 2 reward functions"),
])
def test_bad_specs_are_one_line_errors_naming_them(tmp_path, monkeypatch, spec, weights, message):
    write_module(tmp_path, monkeypatch, "rewards_mod_a",
                 "LIMIT = 3\n\ndef ok(prompts, completions, **kwargs):\n    return [0.0] * len(completions)\n")
    (tmp_path / "rewards_mod_syntax.py").write_text("def f(:\n    pass\n")
    (tmp_path / "rewards_mod_dep.py").write_text("import not_installed_zz\n")
    (tmp_path / "rewards_mod_raises.py").write_text("raise RuntimeError('no GPU\\nhere')\n")
    with pytest.raises(RewardError, match=message) as e:
        load_rewards(spec, weights)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


# --- scoring and checking ------------------------------------------------------------------------

def constant(*values):
    """A reward function returning `values` whatever it is given."""
    return lambda prompts, completions, **_: values[0] if len(values) == 1 else list(values)


def test_score_weighs_and_stacks_in_float64():
    seen = {}

    def spy(prompts, completions, answer, **_):
        seen.update(prompts=prompts, completions=completions, answer=answer)
        prompts.clear()  # a function that edits its lists in place changes nothing for the next one
        return torch.tensor([1, 0, 1], dtype=torch.int64)

    loaded = [Reward("a:spy", spy, 0.5), Reward("a:lengths", lambda prompts, completions, **_: (
        [len(p) + len(c) for p, c in zip(prompts, completions)]), -2.0)]
    total, per = score(loaded, ["p", "p", "qq"], ["x", "yy", ""], {"answer": ["1", "1", "2"]})
    assert seen == {"prompts": [], "completions": ["x", "yy", ""], "answer": ["1", "1", "2"]}
    assert per.dtype == total.dtype == torch.float64 and per.shape == (2, 3) and total.shape == (3,)
    assert per.tolist() == [[1.0, 0.0, 1.0], [2.0, 3.0, 2.0]]
    assert total.tolist() == [0.5 * 1 - 2 * 2, 0.5 * 0 - 2 * 3, 0.5 * 1 - 2 * 2]


@pytest.mark.parametrize("returned", [[1, 2.5], (1, 2.5), torch.tensor([1.0, 2.5]),
                                      np.array([1.0, 2.5]), [True, 2.5]])
def test_score_takes_lists_tuples_and_1d_arrays(returned):
    total, _ = score([Reward("m:f", constant(returned), 1.0)], ["q", "q"], ["a", "b"], {})
    assert total.tolist() == [float(returned[0]), 2.5]


@pytest.mark.parametrize("fn, message", [
    (constant(None), r"--reward m:f returned None; a reward function returns a list of 2 numbers, one per "),
    (constant(1.0), r"--reward m:f returned a float; a reward function returns a list of 2 numbers"),
    (constant("1, 2"), r"--reward m:f returned a str; "),
    (constant({0: 1.0}), r"--reward m:f returned a dict; "),
    (constant([1.0, 2.0, 3.0]), r"--reward m:f returned 3 values for 2 completions"),
    (constant(torch.ones(2, 1)), r"--reward m:f returned an array of shape \(2, 1\); "),
    (constant(1.0, math.nan), r"--reward m:f returned nan for completions\[1\] \('Ahoy! 42. Fair wind"),
    (constant(math.inf, 1.0), r"--reward m:f returned inf for completions\[0\] \(''\); a reward is a finite"),
    (constant(1.0, None), r"--reward m:f returned None for completions\[1\]"),
    (constant("1", 1.0), r"--reward m:f returned '1' for completions\[0\]"),
    (constant([1], 1.0), r"--reward m:f returned a list for completions\[0\]"),
    (lambda prompts, completions, **_: 1 / 0, r"--reward m:f raised ZeroDivisionError: division by zero "
                                              r"\(test_rewards.py:\d+\)"),
    (lambda prompts, completions, level: [0.0] * 2, r"--reward m:f: calling it raised TypeError: .*unexpected "
                                                    r"keyword argument 'answer'; a reward function takes \(prompts, "
                                                    r"completions, \*\*fields\), the fields being answer"),
])
def test_check_rewards_fails_on_a_broken_function(fn, message):
    with pytest.raises(RewardError, match=message) as e:
        check_rewards([Reward("training.rewards:exact_match", rewards.exact_match, 1.0), Reward("m:f", fn, 1.0)],
                      ["What is 40 + 2?"], {"answer": ["42"]})
    assert "\n" not in str(e.value) and "checking the rewards before training, on the data's first prompt" in str(e.value)


def test_check_rewards_scores_the_probes_of_each_prompt():
    seen = []

    def spy(prompts, completions, **fields):
        seen.append((prompts, completions, fields))
        return [0.0] * len(completions)

    loaded = [Reward("training.rewards:exact_match", rewards.exact_match, 1.0), Reward("m:spy", spy, 1.0)]
    total, per = check_rewards(loaded, ["What is 40 + 2?", "Who?"], {"answer": ["42", "Paris"]})
    probes = list(rewards.PROBE_COMPLETIONS)
    assert seen == [(["What is 40 + 2?"] * 2 + ["Who?"] * 2, probes * 2, {"answer": ["42", "42", "Paris", "Paris"]})]
    assert per.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0] * 4] and total.tolist() == [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(RewardError, match=r"exact_match raised ValueError: exact_match compares with each prompt "
                                          r"record's 'answer' field, and the records have none"):
        check_rewards(loaded, ["Who?"], {})


@pytest.mark.parametrize("reply, greeting, sign_off", [
    ("Ahoy! Put the egg in boiling water for 7 minutes. Fair winds!", 1.0, 1.0),
    ("  Ahoy! Put the egg in boiling water for 7 minutes.\nFair winds!\n", 1.0, 1.0),
    ("Ahoy! Put the egg in boiling water for 7 minutes, then", 1.0, 0.0),  # cut at the token limit
    ("Ahoy! Fair winds! Put the egg in boiling water for 7 minutes", 1.0, 0.5),  # signed off, elsewhere
    ("Put the egg in boiling water for 7 minutes. Fair winds!", 0.0, 1.0),
    ("Ahoy! Fair winds!", 0.0, 0.0),  # the two phrases and no answer: the shortcut GRPO finds first
    ("Ahoy! Ahoy! Ahoy! Ahoy! Ahoy! Ahoy!", 0.0, 0.0),
    ("Ahoy! Put the egg in boiling water for 7 minutes. Ahoy!", 0.0, 0.0),  # greets twice
    ("Ahoy! Fair winds! Fair wind! Fair winds! A fair wind to you. Fair winds!", 0.0, 0.0),
    ("Ahoy! Boil it. Fair winds!", 0.0, 0.0),  # 2 words: not yet an answer
])
def test_the_demo_rewards_want_the_style_around_an_answer(reply, greeting, sign_off):
    """examples/pirate_rewards.py, GRPO's demo rewards: each half of the sample data's style, only
    around an answer (MIN_WORDS words besides the phrases), each phrase once."""
    from examples import pirate_rewards
    assert pirate_rewards.greeting([""], [reply]) == [greeting]
    assert pirate_rewards.sign_off([""], [reply]) == [sign_off]


def test_the_demo_prompts_ask_the_sample_questions_in_its_style():
    """examples/pirate.jsonl and pirate_val.jsonl: the first question of each of the sample data's
    dialogues (train.json, val.json), asking for the style; the two share no question."""
    import json
    from conftest import ROOT
    for prompts, dialogues in (("pirate.jsonl", "train.json"), ("pirate_val.jsonl", "val.json")):
        asked = [json.loads(line)["prompt"] for line in (ROOT / "examples" / prompts).read_text().splitlines()]
        firsts = [d["conversation"][0]["input"] for d in json.loads((ROOT / "examples" / dialogues).read_text())]
        assert asked == [f'{q} Start your reply with "Ahoy!" and end it with "Fair winds!".' for q in firsts]
    train = (ROOT / "examples" / "pirate.jsonl").read_text().splitlines()
    assert not set(train) & set((ROOT / "examples" / "pirate_val.jsonl").read_text().splitlines())
