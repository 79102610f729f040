"""Prompt-only data for GRPO: each record a prompt to sample completions for, with any fields the
reward functions read.

Records (in .json, .jsonl or .csv, read as data/formats.py reads SFT records), in TRL's prompt-only
formats:

    standard        {"prompt": "What is 17 + 25? Answer with the number only.", "answer": "42"}
    conversational  {"prompt": [{"role": "system", "content": ...}, {"role": "user", "content": ...}],
                     "answer": "42"}

A string prompt is one user message; a message-list prompt may hold a system prompt and earlier
turns, and ends with a user message (read as data/preference.py reads DPO's prompts). Every other
field of a record is kept as it is and handed to the reward functions (training/rewards.py) by
name: `answer` above reaches `exact_match(prompts, completions, answer, **_)` as a list aligned
with the completions. A field some records lack is None in those, as in a `datasets` table with
that column (an empty CSV cell is a field the record lacks). `prompts` and `completions` are
refused as field names: they are the reward functions' own arguments.

A prompt is rendered through the model's chat template with the generation prompt (the header the
reply follows), as transformers' apply_chat_template(messages, add_generation_prompt=True) renders
it, and is never truncated: a prompt longer than max_prompt_len tokens is dropped and counted, since
a cut prompt asks a different question, or none. An example:

    {"prompt_ids", "prompt", "prompt_text", "fields", "line"}

prompt_ids the tokens, prompt the messages, prompt_text the last user message's content (what a
reward function sees as prompts[i]), fields the record's other fields, line its line in the file.
"""

from dataclasses import dataclass
from pathlib import Path

import jinja2

from .formats import DataError, RecordError, convert_records, read_records
from .preference import _messages

RESERVED = ("prompts", "completions")  # a reward function's positional arguments
REPLY_FIELDS = ("chosen", "rejected", "completion")  # a preference or unpaired file, not prompts


@dataclass
class PromptData:
    """A prompt file tokenized: examples as above, in file order."""
    path: Path
    examples: list[dict]
    n_records: int
    n_dropped: int  # prompts longer than max_prompt_len tokens, not in `examples`
    max_prompt_len: int

    @property
    def lengths(self) -> list[int]:
        """Each prompt's length in tokens."""
        return [len(e["prompt_ids"]) for e in self.examples]

    def summary(self) -> str:
        fields = ", ".join(self.examples[0]["fields"]) or "none"
        return (f"{self.path}: {len(self.examples)} prompts of {self.n_records}, {sum(self.lengths)} tokens "
                f"(longest {max(self.lengths)}); {self.n_dropped} dropped (longer than "
                f"max_prompt_len={self.max_prompt_len}); fields for the rewards: {fields}")


def is_prompt_file(path: str | Path) -> bool:
    """Whether the file's first record is a prompt alone: a "prompt" field and no reply (no chosen,
    rejected or completion field, which a preference or unpaired file has)."""
    records = read_records(Path(path))
    if not records or not isinstance(records[0][1], dict):
        return False
    fields = set(records[0][1])
    return "prompt" in fields and not fields & set(REPLY_FIELDS)


def to_prompt(record) -> tuple[list[dict], dict]:
    """(prompt messages, the other fields) of one record."""
    if not isinstance(record, dict):
        raise RecordError(f"expected an object with fields, got {type(record).__name__}")
    if "prompt" not in record:
        found = ", ".join(sorted(map(str, record))) or "none"
        raise RecordError(f"a prompt record needs a prompt field (fields found: {found})")
    reserved = [f for f in RESERVED if f in record]
    if reserved:
        raise RecordError(f"field {reserved[0]!r} is reserved: reward functions get prompts and completions "
                          "as their own arguments; rename it")
    prompt = [m for m in _messages(record["prompt"], "prompt", "user", None)
              if not (m["role"] == "system" and not m["content"].strip())]
    return prompt, {k: v for k, v in record.items() if k != "prompt"}


def load_prompts(path: str | Path) -> list[tuple[int, list[dict], dict]]:
    """(line, prompt messages, other fields) for every record of a prompt file."""
    return [(line, prompt, fields) for line, (prompt, fields) in convert_records(path, to_prompt)]


def tokenize_prompts(path: str | Path, tok, max_prompt_len: int) -> PromptData:
    """Tokenize a prompt file: each prompt through the chat template with the generation prompt
    (tok.encode_chat(prompt, add_generation_prompt=True), batched); a prompt longer than
    max_prompt_len is dropped and counted, never cut."""
    path = Path(path)
    records = load_prompts(path)
    texts = []
    for line, prompt, _ in records:
        try:
            texts.append(tok.render(prompt, add_generation_prompt=True))
        except jinja2.TemplateError as e:
            raise DataError(f"{path}:{line}: chat template error: {e}") from None
    # Every example carries every field any record has (None where it lacks one), so the reward
    # functions always get the same arguments, lists aligned with the completions.
    names = list(dict.fromkeys(k for _, _, fields in records for k in fields))
    examples = []
    for (line, prompt, fields), (ids, _) in zip(records, tok.encode_rendered(texts)):
        if len(ids) > max_prompt_len:
            continue
        examples.append({"prompt_ids": ids, "prompt": prompt, "prompt_text": prompt[-1]["content"],
                         "fields": {k: fields.get(k) for k in names}, "line": line})
    if not examples:
        raise DataError(f"{path}: all {len(records)} prompts dropped: none fits in "
                        f"max_prompt_len={max_prompt_len} tokens")
    return PromptData(path, examples, len(records), len(records) - len(examples), max_prompt_len)
