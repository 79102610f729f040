"""Preference data for DPO: each record a prompt and two replies, the chosen and the rejected one.

Records (in .json, .jsonl or .csv, read as data/formats.py reads SFT records), in TRL's two formats:

    standard        {"prompt": "text", "chosen": "text", "rejected": "text"}
    conversational  {"prompt": [{"role": "user", "content": ...}, ...],
                     "chosen": [{"role": "assistant", "content": ...}],
                     "rejected": [{"role": "assistant", "content": ...}]}

A string prompt is one user message; a message-list prompt may hold a system prompt and earlier
turns (it must end with a user message). A string reply is one assistant message.

Each side is the conversation prompt + reply, rendered through the model's chat template exactly as
SFT renders it, and masked as SFT's `--mask last` masks it (data/masking.py): only the reply's
tokens and its end-of-turn token train, the prompt (earlier assistant turns included) never does.
An example then holds both sides:

    {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "line", "truncated"}

and a micro-batch of B pairs is one (2B, T) batch, the B chosen rows first and then the B rejected
ones in the same order, so one forward gives both log-probabilities of every pair.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch

from .batching import collate
from .dataset import trained_count
from .formats import DataError, RecordError, convert_records, read_records
from .masking import mask_labels, reply_spans

FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant")


@dataclass
class PreferenceData:
    """A preference file tokenized: examples as above, in file order."""
    path: Path
    examples: list[dict]
    n_records: int
    n_truncated: int  # pairs with a side cut to max_seq_len (and kept)
    n_dropped: int  # pairs with a side left with no trained token, not in `examples`
    examples_per_s: float
    max_seq_len: int

    @property
    def lengths(self) -> list[int]:
        """The longer side of each pair: what its rows are padded to."""
        return [max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in self.examples]

    def summary(self) -> str:
        tokens = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in self.examples)
        trained = sum(trained_count(e["chosen_labels"]) + trained_count(e["rejected_labels"])
                      for e in self.examples)
        return (f"{self.path}: {len(self.examples)} preference pairs of {self.n_records}, {tokens} tokens, "
                f"{trained} trained (the replies); {self.n_truncated} truncated to {self.max_seq_len}, "
                f"{self.n_dropped} dropped (a reply with no trained token left); "
                f"{self.examples_per_s:,.0f} pairs/s")


def is_preference_file(path: str | Path) -> bool:
    """Whether the file's first record has the preference fields (for data.inspect)."""
    records = read_records(Path(path))
    return bool(records) and isinstance(records[0][1], dict) and set(FIELDS) <= set(records[0][1])


def _messages(value, field: str, last_role: str | None, only_role: str | None) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"field {field!r} is empty")
        return [{"role": only_role or "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise RecordError(f"field {field!r} must be a string or a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RecordError(f"{field} message {i + 1} must be {{\"role\": system|user|assistant, "
                              f"\"content\": string}}")
        if only_role and m["role"] != only_role:
            raise RecordError(f"{field} message {i + 1} has role {m['role']!r}; a reply's messages are "
                              f"{only_role!r}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise RecordError(f"{field} message {i + 1} is an empty reply")
        messages.append({"role": m["role"], "content": m["content"]})
    if last_role and messages[-1]["role"] != last_role:
        raise RecordError(f"field {field!r} must end with a {last_role} message, not {messages[-1]['role']}")
    return messages


def to_pair(record) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen reply messages, rejected reply messages) of one record."""
    if not isinstance(record, dict):
        raise RecordError(f"expected an object with fields, got {type(record).__name__}")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        found = ", ".join(sorted(map(str, record))) or "none"
        raise RecordError(f"a preference record needs prompt, chosen and rejected; missing "
                          f"{', '.join(missing)} (fields found: {found})")
    prompt = [m for m in _messages(record["prompt"], "prompt", "user", None)
              if not (m["role"] == "system" and not m["content"].strip())]
    return (prompt, _messages(record["chosen"], "chosen", None, "assistant"),
            _messages(record["rejected"], "rejected", None, "assistant"))


def load_pairs(path: str | Path) -> list[tuple[int, tuple]]:
    """(line, (prompt, chosen, rejected)) for every record of a preference file."""
    return convert_records(path, to_pair)


def reply_labels(tok, prompt: list[dict], reply: list[dict]) -> tuple[str, list]:
    """(rendered text, spans) of prompt + reply, the spans of the reply's messages only."""
    messages = prompt + reply
    full = tok.render(messages)
    spans = reply_spans(tok, messages, full, "assistant")  # one per assistant message, in order
    n_before = sum(m["role"] == "assistant" for m in prompt)
    return full, spans[n_before:]


def tokenize_pairs(path: str | Path, tok, max_seq_len: int) -> PreferenceData:
    """Tokenize a preference file: both sides of every pair, truncated to max_seq_len (keeping the
    start, as SFT does); a pair with a side left with nothing to train is dropped and counted."""
    start = time.perf_counter()
    path = Path(path)
    pairs = load_pairs(path)
    texts, spans = [], []
    for line, (prompt, chosen, rejected) in pairs:
        try:
            for reply in (chosen, rejected):
                text, span = reply_labels(tok, prompt, reply)
                texts.append(text)
                spans.append(span)
        except RecordError as e:
            raise DataError(f"{path}:{line}: {e}") from None
        except jinja2.TemplateError as e:
            raise DataError(f"{path}:{line}: chat template error: {e}") from None
    encoded = tok.encode_rendered(texts)
    examples, n_truncated, n_dropped = [], 0, 0
    for k, (line, _) in enumerate(pairs):
        example, truncated, empty = {"line": line}, False, False
        for j, side in enumerate(("chosen", "rejected")):
            ids, offsets = encoded[2 * k + j]
            labels, _ = mask_labels(ids, offsets, spans[2 * k + j], tok.stop_ids)
            truncated |= len(ids) > max_seq_len
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            empty |= trained_count(labels) == 0
            example[f"{side}_ids"], example[f"{side}_labels"] = ids, labels
        if empty:
            n_dropped += 1
            continue
        n_truncated += truncated
        examples.append({**example, "truncated": truncated})
    if not examples:
        raise DataError(f"{path}: all {len(pairs)} pairs dropped: none has both replies within "
                        f"max_seq_len={max_seq_len}")
    rate = len(pairs) / max(time.perf_counter() - start, 1e-9)
    return PreferenceData(path, examples, len(pairs), n_truncated, n_dropped, rate, max_seq_len)


def side(example: dict, which: str) -> dict:
    """One side of a pair as an SFT example: {"input_ids", "labels"}."""
    return {"input_ids": example[f"{which}_ids"], "labels": example[f"{which}_labels"]}


def make_pair_batch(examples: list[dict], idx: list[int], pad_id: int) -> dict:
    """The (2B, T) batch of pairs idx: rows 0..B-1 chosen, B..2B-1 rejected, right-padded
    (data.collate); `pairs` is B. With reference log-probs precomputed (`ref_chosen`,
    `ref_rejected` in the examples), `ref_logps` (2B,) in the same row order."""
    chosen = [side(examples[i], "chosen") for i in idx]
    rejected = [side(examples[i], "rejected") for i in idx]
    batch = collate(chosen + rejected, pad_id)
    batch["pairs"] = len(idx)
    if idx and "ref_chosen" in examples[idx[0]]:
        batch["ref_logps"] = torch.tensor([examples[i]["ref_chosen"] for i in idx] +
                                          [examples[i]["ref_rejected"] for i in idx], dtype=torch.float64)
    return batch
