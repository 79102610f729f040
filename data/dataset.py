"""A data file tokenized for training: truncated, examples with nothing to train dropped (and
counted), cached on disk, and split into train and validation.

The cache is a safetensors file (never pickle), keyed by the data file's content, the tokenizer,
chat template and special tokens, the mask mode and max_seq_len: change any of them and the file
is tokenized again.
"""

import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model.files import save_safetensors

from .formats import DataError, RecordError, check_file, load_conversations_with_lines
from .masking import IGNORE_INDEX, tokenize_conversations
from .templates import ChatTemplateError

CACHE_VERSION = "2"  # bump when tokenization changes, to invalidate old caches (2: "weight": 0)
COUNTS = ("n_records", "n_truncated", "n_dropped", "n_unterminated", "n_weight_zero")  # kept in the cache


@dataclass
class TokenizedData:
    """examples: dicts with input_ids and labels (lists of ints, same length <= max_seq_len),
    `line` (the record's line in the file) and `truncated` (bool), in file order."""

    path: Path
    examples: list[dict]
    n_records: int  # records in the file
    n_truncated: int  # examples cut to max_seq_len (and kept)
    n_dropped: int  # examples left with no trained token (after truncation), not in `examples`
    n_unterminated: int  # replies whose template writes no end-of-turn token
    examples_per_s: float  # records tokenized (or read from the cache) per second
    from_cache: bool
    mask: str  # which tokens train: assistant | last | all
    max_seq_len: int
    n_weight_zero: int = 0  # replies with "weight": 0 (context, not trained), in all records

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]

    @property
    def n_trained_tokens(self) -> int:
        return sum(trained_count(e["labels"]) for e in self.examples)

    def summary(self) -> str:
        """One line for the training log: nothing is dropped or truncated silently."""
        line = (f"{self.path}: {len(self.examples)} examples of {self.n_records}, "
                f"{sum(self.lengths)} tokens, {self.n_trained_tokens} trained (mask={self.mask}); "
                f"{self.n_truncated} truncated to {self.max_seq_len}, {self.n_dropped} dropped "
                f"(no trained token left); "
                + (f"{self.n_weight_zero} replies of weight 0 (context, not trained); " if self.n_weight_zero else "")
                + f"{self.examples_per_s:,.0f} examples/s{' (cache)' if self.from_cache else ''}")
        if self.n_unterminated:
            line += (f"; WARNING: {self.n_unterminated} replies have no end-of-turn token in the "
                     "template, the model will not learn to stop after them")
        return line


def trained_count(labels) -> int:
    """Tokens that carry loss: labels[0] never does, since the loss predicts labels[1:]."""
    return sum(1 for y in labels[1:] if y != IGNORE_INDEX)


def default_cache_dir() -> Path:
    root = os.environ.get("NANOLORA_CACHE") or "~/.cache/nanolora"
    return Path(root).expanduser() / "tokenized"


def cache_key(data: bytes, tok, mask: str, max_seq_len: int) -> str:
    h = hashlib.sha256(data)
    h.update(json.dumps([CACHE_VERSION, tok.fingerprint, mask, max_seq_len]).encode())
    return h.hexdigest()[:24]


def tokenize_file(path: str | Path, tok, max_seq_len: int, mask: str = "assistant",
                  cache_dir: str | Path | None = None, use_cache: bool = True) -> TokenizedData:
    """Tokenize a data file (or read it from the cache: `cache_dir`, default <nanolora cache>/tokenized)."""
    path = Path(path)
    check_file(path)
    start = time.perf_counter()
    cache_file = None
    if use_cache:
        key = cache_key(path.read_bytes(), tok, mask, max_seq_len)
        cache_file = Path(cache_dir or default_cache_dir()) / f"{path.stem}-{key}.safetensors"
        data = load_cache(cache_file, path, mask, max_seq_len) if cache_file.exists() else None
        if data is not None:
            data.examples_per_s = data.n_records / max(time.perf_counter() - start, 1e-9)
            return data
    data = _tokenize(path, tok, max_seq_len, mask)
    data.examples_per_s = data.n_records / max(time.perf_counter() - start, 1e-9)
    if cache_file is not None:
        save_cache(cache_file, data)
    return data


def _tokenize(path: Path, tok, max_seq_len: int, mask: str) -> TokenizedData:
    records = load_conversations_with_lines(path)
    try:
        encoded = tokenize_conversations(tok, [messages for _, messages in records], mask)
    except RecordError as e:
        raise DataError(f"{path}:{records[e.index][0]}: {e}") from None
    except (DataError, ChatTemplateError) as e:
        raise DataError(f"{path}: {e}") from None
    examples, n_truncated, n_dropped, n_unterminated = [], 0, 0, 0
    for (line, _), (ids, labels, unterminated) in zip(records, encoded):
        truncated = len(ids) > max_seq_len
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]  # keep the start: the prompt
        if trained_count(labels) == 0:
            n_dropped += 1
            continue
        n_truncated += truncated
        n_unterminated += unterminated
        examples.append({"input_ids": ids, "labels": labels, "line": line, "truncated": truncated})
    n_weight_zero = sum(m.get("weight") == 0 for _, messages in records for m in messages)
    if not examples:
        raise DataError(f"{path}: all {len(records)} examples dropped: none has a trained token "
                        f"within max_seq_len={max_seq_len} (mask={mask})")
    return TokenizedData(path, examples, len(records), n_truncated, n_dropped, n_unterminated,
                         0.0, False, mask, max_seq_len, n_weight_zero)


# --- the cache: ragged examples as flat int32 tensors plus offsets ---

def save_cache(cache_file: Path, data: TokenizedData):
    ex = data.examples
    lengths = torch.tensor([len(e["input_ids"]) for e in ex], dtype=torch.int64)
    tensors = {
        "input_ids": torch.tensor([t for e in ex for t in e["input_ids"]], dtype=torch.int32),
        "labels": torch.tensor([t for e in ex for t in e["labels"]], dtype=torch.int32),
        "lengths": lengths,
        "lines": torch.tensor([e["line"] for e in ex], dtype=torch.int64),
        "truncated": torch.tensor([e["truncated"] for e in ex], dtype=torch.uint8),
    }
    meta = {k: str(getattr(data, k)) for k in COUNTS}
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, tmp, metadata=meta)
        os.replace(tmp, cache_file)  # atomic: a crash never leaves a half-written cache
    except (OSError, SafetensorError) as e:  # a full disk: the data is tokenized, go on without
        tmp.unlink(missing_ok=True)
        print(f"warning: {cache_file}: tokenization cache not written ({e})", file=sys.stderr)


def load_cache(cache_file: Path, path: Path, mask: str, max_seq_len: int) -> TokenizedData | None:
    """The cached tokenization, or None if the file is unreadable (cut short, say, by a full disk or
    a crash before the atomic rename existed): it is only a cache, so it is deleted, with a
    one-line warning, and the data file is tokenized again."""
    try:
        return _read_cache(cache_file, path, mask, max_seq_len)
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as e:
        # (not safetensors; a key or a metadata entry missing; tensors that do not add up)
        print(f"warning: {cache_file}: unreadable tokenization cache ({type(e).__name__}: {e}); "
              "tokenizing again", file=sys.stderr)
        cache_file.unlink(missing_ok=True)
        return None


def _read_cache(cache_file: Path, path: Path, mask: str, max_seq_len: int) -> TokenizedData:
    with safe_open(str(cache_file), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in ("input_ids", "labels", "lengths", "lines", "truncated")}
    lengths = t["lengths"].tolist()
    ids = t["input_ids"].split(lengths)  # RuntimeError unless the lengths add up to the tokens
    labels = t["labels"].split(lengths)
    if not len(ids) == len(labels) == len(t["lines"]) == len(t["truncated"]) > 0:
        raise ValueError("its tensors disagree on the number of examples")
    examples = [{"input_ids": i.tolist(), "labels": y.tolist(), "line": line, "truncated": bool(tr)}
                for i, y, line, tr in zip(ids, labels, t["lines"].tolist(), t["truncated"].tolist())]
    counts = {k: int(meta[k]) for k in COUNTS}
    return TokenizedData(path, examples, **counts, examples_per_s=0.0, from_cache=True, mask=mask,
                         max_seq_len=max_seq_len)


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded random `fraction` of the examples held out; both keep file order.
    fraction 0 holds out nothing."""
    if not 0 <= fraction < 1:
        raise ValueError(f"val fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return list(examples), []
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise DataError(f"val fraction {fraction} of {len(examples)} examples leaves none to train on")
    held_out = set(random.Random(f"val-{seed}").sample(range(len(examples)), n_val))
    train = [e for i, e in enumerate(examples) if i not in held_out]
    val = [e for i, e in enumerate(examples) if i in held_out]
    return train, val
