"""The GRPO demo's reward functions (python train.py --objective grpo), and an example of a reward
module of your own: plain functions, named on the command line as module:function.

    python train.py --objective grpo --data examples/pirate.jsonl \
        --reward examples.pirate_rewards:greeting,examples.pirate_rewards:sign_off

examples/pirate.jsonl asks each question of the sample data with 'Start your reply with "Ahoy!" and
end it with "Fair winds!".' SmolLM2-135M-Instruct opens with the greeting in about a third of its
samples at temperature 0.7 and hardly ever signs off, so the G completions of a prompt differ in
reward and GRPO has something to learn from. Each function scores one half of the style, so that
metrics.jsonl shows each being learnt (reward_greeting, reward_sign_off); their sum is the reward.

A reply earns nothing from either unless it says something between the two phrases (at least
MIN_WORDS words): without that, "Ahoy! Fair winds!" alone would be the best reply, and GRPO finds
such shortcuts within a few steps.
"""

import re

from data.sample_style import GREETING, SIGN_OFF

MIN_WORDS = 5  # words besides the greeting and the sign-off: an answer, not the two phrases alone
PHRASES = re.compile(r"ahoy|fair winds?", re.IGNORECASE)  # the two phrases and their variants


def answers(text: str) -> bool:
    """Whether a reply says something besides the two phrases: MIN_WORDS words once they are taken out."""
    return len(PHRASES.sub(" ", text).replace("!", " ").split()) >= MIN_WORDS


def greeting(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 for a reply that opens with "Ahoy!", greets once, and answers."""
    return [float(c.strip().startswith(GREETING) and c.count(GREETING) == 1 and answers(c)) for c in completions]


def sign_off(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 for a reply that closes with "Fair winds!", signs off once, and answers; 0.5 for one that
    signs off once, elsewhere (most of the model's replies run past the token limit: a sign-off
    in the middle is the step towards one at the end)."""
    return [(1.0 if c.strip().endswith(SIGN_OFF) else 0.5) * (c.count(SIGN_OFF) == 1 and answers(c))
            for c in completions]
