"""The reply style of the sample data set in examples/, and a check for it.

Every assistant reply in examples/train.json (and val.json) starts with GREETING and ends with SIGN_OFF,
a style the base model never uses on its own: after a few minutes of LoRA training the demo's
answers to the held-out prompts (examples/prompts.txt) should start showing it.
"""

GREETING = "Ahoy!"
SIGN_OFF = "Fair winds!"


def shows_style(text: str) -> bool:
    """True if a reply opens with the sample data's greeting (the sign-off may be cut off by a
    generation length limit, so it is not required)."""
    return text.strip().startswith(GREETING)
