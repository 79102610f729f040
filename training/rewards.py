"""GRPO's reward functions: Python functions that score sampled completions, loaded by name.

    python train.py --objective grpo --data prompts.jsonl \\
        --reward training.rewards:exact_match,training.rewards:format_reward --reward-weights 1,0.5

A reward function follows TRL's convention:

    def my_reward(prompts: list[str], completions: list[str], **fields) -> list[float]

prompts[i] is the prompt of completion i (its last user message), completions[i] the completion's
text (decoded, without the end-of-turn token), and each other field of the prompt records
(data/prompts.py: `answer`, say) is a keyword argument, a list aligned with completions (a prompt's
value repeated for each of its G completions). A function takes `**kwargs` for the fields it does
not read. It returns one finite number per completion; anything else (None included) is an error
naming it. A completion's reward is the weighted sum of its functions' rewards, which GRPO then
normalises within each prompt's group into advantages.

`--reward module:function[,module:function]` names them; the module is imported from the current
directory (first, as `python -m` would look), the python path or this repository (the demo's
examples.pirate_rewards), so a file `my_rewards.py` beside the data is `--reward my_rewards:my_reward`. The shipped ones, `training.rewards:NAME`:

    exact_match     1 if the completion's final answer equals the record's `answer`, else 0
    format_reward   1 if the completion is <think>...</think><answer>...</answer>, else 0
    length_penalty  0 up to TARGET_CHARS characters, then down linearly to -1 at twice that

and regex_reward(pattern) makes a format reward for another pattern.
"""

import importlib
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from model.errors import UserError


class RewardError(UserError):
    """A reward function that cannot be loaded or that returned something unusable; one line naming it."""


class Reward(NamedTuple):
    name: str  # as --reward named it, "module:function": how errors and logs name it
    fn: Callable
    weight: float


# --- loading -------------------------------------------------------------------------------------

def load_rewards(spec: str, weights: str | None) -> list[Reward]:
    """The functions of `--reward module:function[,module:function]`, each with its weight from
    `--reward-weights w1,w2` (one number per function; 1 each when None)."""
    names = [s.strip() for s in spec.split(",")]
    fns = [_load_function(name) for name in names]
    if weights is None:
        return [Reward(name, fn, 1.0) for name, fn in zip(names, fns)]
    values = []
    for w in weights.split(","):
        try:
            value = float(w)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise RewardError(f"--reward-weights {weights}: expected numbers like 1,0.5, got {w.strip()!r}")
        values.append(value)
    if len(values) != len(fns):
        raise RewardError(f"--reward-weights {weights}: {len(values)} weights for {len(fns)} reward "
                          f"function{'s' * (len(fns) != 1)} ({', '.join(names)})")
    return [Reward(name, fn, w) for name, fn, w in zip(names, fns, values)]


def _load_function(name: str) -> Callable:
    module_name, _, attr = name.partition(":")
    if module_name.endswith(".py") or "/" in module_name:
        raise RewardError(f"--reward {name}: name the module, not its file ({Path(module_name).stem}:{attr or 'f'}), "
                          "importable from the current directory")
    if not (module_name and attr) or not all(part.isidentifier() for part in module_name.split(".") + [attr]):
        raise RewardError(f"--reward {name!r}: expected module:function, like training.rewards:exact_match")
    module = _import(name, module_name)
    if not hasattr(module, attr):
        public = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                  and not isinstance(v, type)]
        where = getattr(module, "__file__", None) or "a namespace package"
        raise RewardError(f"--reward {name}: module {module_name} ({where}) has no function {attr!r}"
                          + (f"; it has {', '.join(public[:8])}" if public else ""))
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardError(f"--reward {name}: {module_name}.{attr} is a {type(fn).__name__}, not a function")
    return fn


REPOSITORY = str(Path(__file__).resolve().parents[1])  # the demo's examples.pirate_rewards is there


def _import(name: str, module_name: str):
    """The module, with the current directory first on sys.path while it is imported, and this
    repository last (examples/: the demo's reward functions, from any directory)."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    sys.path.append(REPOSITORY)
    importlib.invalidate_caches()  # a module written since the last import is found
    try:
        return importlib.import_module(module_name)
    except Exception as e:
        name_missing = isinstance(e, ModuleNotFoundError) and e.name and (
            module_name == e.name or module_name.startswith(e.name + "."))  # the module, not one it imports
        if name_missing:
            raise RewardError(f"--reward {name}: no module named {e.name!r} in the current directory ({cwd}) "
                              "or on the python path") from None
        # the module's own code failed: a syntax error, a missing dependency, ...
        raise RewardError(f"--reward {name}: importing {module_name} raised {_one_line(e)}") from e
    finally:
        if cwd in sys.path:  # (unless the module took it out)
            sys.path.remove(cwd)  # the first occurrence: the one inserted above
        if sys.path and sys.path[-1] == REPOSITORY:
            sys.path.pop()


def _one_line(e: BaseException, where: bool = True) -> str:
    """An exception as 'Type: message' on one line, with the file and line it was raised at (a
    SyntaxError's message names them already; importlib's own frames are no help)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<frozen")]
    at = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if (
        where and frames and not isinstance(e, SyntaxError)) else ""
    return f"{type(e).__name__}: {' '.join(str(e).split())}{at}"


# --- scoring -------------------------------------------------------------------------------------

def score(rewards: list[Reward], prompts: list[str], completions: list[str], fields: dict[str, list]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, per_function): every function's rewards for the N completions, checked, as per_function
    (F, N) float64, and their weighted sum total (N,) float64 = sum_f weight_f * per_function[f].

    prompts and each list in fields are aligned with completions. Each function gets its own
    copies of the lists, so one that edits them in place cannot change what the next one sees."""
    n = len(completions)
    if len(prompts) != n or any(len(v) != n for v in fields.values()):
        raise ValueError(f"score: prompts and fields must be aligned with the {n} completions")
    per_function = torch.empty(len(rewards), n, dtype=torch.float64)
    for k, reward in enumerate(rewards):
        try:
            out = reward.fn(list(prompts), list(completions), **{key: list(v) for key, v in fields.items()})
        except Exception as e:
            if e.__traceback__.tb_next is None:  # the call itself failed (its arguments), not the function
                raise RewardError(f"--reward {reward.name}: calling it raised {_one_line(e, where=False)}; a reward "
                                  f"function takes (prompts, completions, **fields), the fields being "
                                  f"{', '.join(fields) or 'none'}") from e
            raise RewardError(f"--reward {reward.name} raised {_one_line(e)}") from e
        per_function[k] = torch.tensor(_checked(reward.name, out, completions), dtype=torch.float64)
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float64)
    return (weights[:, None] * per_function).sum(0), per_function


def _checked(name: str, out, completions: list[str]) -> list[float]:
    """A function's return value as N floats, or a RewardError saying what is wrong with it."""
    n = len(completions)
    expected = f"a reward function returns a list of {n} numbers, one per completion"
    if isinstance(out, (list, tuple)):
        values = list(out)
    elif hasattr(out, "ndim") and hasattr(out, "tolist"):  # a torch tensor or a numpy array
        if out.ndim != 1:
            raise RewardError(f"--reward {name} returned an array of shape {tuple(out.shape)}; {expected}")
        values = out.tolist()
    else:
        raise RewardError(f"--reward {name} returned {'None' if out is None else 'a ' + type(out).__name__}; "
                          f"{expected}")
    if len(values) != n:
        raise RewardError(f"--reward {name} returned {len(values)} values for {n} completions")
    floats = []
    for i, v in enumerate(values):
        try:
            x = math.nan if isinstance(v, (str, bytes)) else float(v)
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            got = repr(v) if isinstance(v, (float, int, str)) or v is None else f"a {type(v).__name__}"
            raise RewardError(f"--reward {name} returned {got} for completions[{i}] "
                              f"({_short(completions[i])}); a reward is a finite number")
        floats.append(x)
    return floats


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


# What check_rewards scores before training: each probe prompt with two made-up completions. ""
# is what a policy that ends its turn at once produces (no number, no tags: extraction must cope);
# the other is a short reply in the sample style holding a number, so that number parsing runs.
PROBE_COMPLETIONS = ("", "Ahoy! 42. Fair winds!")


def check_rewards(rewards: list[Reward], example_prompts: list[str], example_fields: dict[str, list]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score PROBE_COMPLETIONS for each of example_prompts (the first prompt or two of the data,
    their fields in example_fields, aligned with them), before the model loads: a function that
    raises, returns the wrong count or a non-number fails in seconds, not after the first sampling.
    Returns score's (total, per_function) of the 2 * len(example_prompts) probes."""
    if not example_prompts:
        raise ValueError("check_rewards needs at least one prompt")
    g = len(PROBE_COMPLETIONS)
    prompts = [p for p in example_prompts for _ in range(g)]
    fields = {k: [x for x in v for _ in range(g)] for k, v in example_fields.items()}
    try:
        return score(rewards, prompts, list(PROBE_COMPLETIONS) * len(example_prompts), fields)
    except RewardError as e:
        which = "prompt" if len(example_prompts) == 1 else f"{len(example_prompts)} prompts"
        raise RewardError(f"{e} (checking the rewards before training, on the data's first {which} with the "
                          f"made-up completions {', '.join(map(repr, PROBE_COMPLETIONS))})") from e


# --- the shipped reward functions ----------------------------------------------------------------

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A number: an optional minus (not one between two numbers, as in "10-8"), digits with or without
# thousands separators, an optional decimal part.
NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """A completion's final answer: the content of the last <answer>...</answer>; else of the last
    \\boxed{...} (nested braces kept); else the rest of the line after the last "####" (GSM8K's
    marker); else the last number in the text; None when there is none of these."""
    tags = ANSWER_TAG.findall(text)
    if tags:
        return tags[-1]
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n")[0]
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i]
    return None  # unbalanced: not a boxed answer


def normalize_answer(text: str) -> str:
    """Strip spaces, thousands separators ("1,234" -> "1234") and one trailing period."""
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text.strip())
    return text[:-1].strip() if text.endswith(".") else text


def same_answer(found: str, expected: str) -> bool:
    """Whether two answers agree once normalized: numerically when both are numbers ("42.0" and
    "42"), else as strings, ignoring case."""
    a, b = normalize_answer(found), normalize_answer(expected)
    if NUMBER.fullmatch(a) and NUMBER.fullmatch(b):
        return float(a) == float(b)
    return a.lower() == b.lower()


def exact_match(prompts: list[str], completions: list[str], answer: list | None = None, **_) -> list[float]:
    """1.0 where the completion's final answer (extract_answer) is the record's `answer` field
    (same_answer), else 0.0. A number `answer` in the data ({"answer": 42}) compares as its text."""
    if answer is None:
        raise ValueError("exact_match compares with each prompt record's 'answer' field, and the records "
                         "have none")
    rewards = []
    for i, (completion, expected) in enumerate(zip(completions, answer)):
        if expected is None:
            raise ValueError(f"exact_match: the record of completions[{i}] has no 'answer'")
        found = extract_answer(completion)
        rewards.append(float(found is not None and same_answer(found, str(expected))))
    return rewards


# DeepSeek-R1's format: the reasoning in <think> tags, then the answer in <answer> tags, nothing else.
THINK_ANSWER = r"^<think>.*?</think>\s*<answer>.*?</answer>$"


def regex_reward(pattern: str, name: str | None = None) -> Callable:
    """A reward function giving 1.0 to a completion that `pattern` matches (re.match with
    re.DOTALL: from the start, `.` across lines; end the pattern with $ to hold the whole
    completion to it), else 0.0. A module of your own may define

        my_format = regex_reward(r"^Ahoy!.*Fair winds!$")

    and train with `--reward mymodule:my_format`. name: the function's __name__."""
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"regex_reward: bad pattern {pattern!r}: {e}") from None

    def reward(prompts: list[str], completions: list[str], **_) -> list[float]:
        return [1.0 if compiled.match(c) else 0.0 for c in completions]

    reward.__name__ = reward.__qualname__ = name or "regex_reward"
    reward.__doc__ = f"1.0 for a completion matching {pattern!r} (re.match, re.DOTALL), else 0.0."
    return reward


format_reward = regex_reward(THINK_ANSWER, "format_reward")  # 1.0 for <think>...</think> <answer>...</answer>

TARGET_CHARS = 200  # completions up to this long go unpenalised; the penalty reaches -1 at twice it


def length_penalty(prompts: list[str], completions: list[str], **_) -> list[float]:
    """0.0 for a completion of up to TARGET_CHARS characters, then -(len - TARGET_CHARS) / TARGET_CHARS,
    linear in the excess characters, floored at -1.0 (reached at 2 * TARGET_CHARS): paired with a
    correctness reward it keeps answers short without outweighing being right. Copy it and change
    TARGET_CHARS for another length."""
    return [0.0 - min(1.0, max(0, len(c) - TARGET_CHARS) / TARGET_CHARS) for c in completions]
