"""Unpaired data for KTO: each record a prompt, one completion, and whether that completion is good.

Records (in .json, .jsonl or .csv, read as data/formats.py reads SFT records), in TRL's two formats:

    standard        {"prompt": "text", "completion": "text", "label": true}
    conversational  {"prompt": [{"role": "user", "content": ...}, ...],
                     "completion": [{"role": "assistant", "content": ...}],
                     "label": false}

`label` true marks a desirable completion, false an undesirable one; it is a JSON bool, or in a CSV
file (which has no bools) the cell "true" or "false" in any case. Prompts and completions are read
as data/preference.py reads DPO's prompts and replies: a string prompt is one user message, a
message-list prompt may hold a system prompt and earlier turns and ends with a user message, a
completion holds assistant messages only.

The completion row is prompt + completion rendered through the model's chat template and masked as
a DPO reply is: only the completion's tokens and its end-of-turn token train, the prompt (earlier
assistant turns included) never does.

KTO's reference point z0 (Ethayarajh et al. 2024) is the policy's KL from the reference
model, which KTO estimates from mismatched pairs: a prompt with a completion written for another
prompt. As TRL does ("[-1] + [:-1]"), record i's KL row is record i's prompt with record i-1's
completion, cyclic over the file's records in file order (record 0 takes the last record's), then
rendered and masked as the completion rows are. The pairing is made before any example is dropped,
and a file of one record is refused (it has no other completion). TRL 1.x rotates within each
batch of per_device_train_batch_size instead, and so insists on sequential sampling, which keeps a
batch's KL completions the same set as its completions; here the pairs are fixed per file and the
micro-batches may be shuffled, so a batch's KL rows hold its records' predecessors' completions.
Both are the same kind of estimate: the policy's log-ratio on prompts with unrelated completions.

An example:

    {"completion_ids", "completion_labels", "kl_ids", "kl_labels", "desirable", "line", "truncated"}

(desirable the label; truncated: either row was cut to max_seq_len), and a micro-batch of B examples is the (B, T) batch of completion rows with the (B, T') batch of
KL rows beside it (`kl_input_ids`, `kl_labels`), so the loss can take both from one step.
"""

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jinja2
import torch

from .batching import collate
from .dataset import trained_count
from .formats import DataError, RecordError, convert_records, read_records
from .masking import mask_labels
from .preference import _messages, reply_labels

FIELDS = ("prompt", "completion", "label")
CSV_LABELS = {"true": True, "false": False}  # a CSV cell is a string: its words for the JSON bools


@dataclass
class UnpairedData:
    """An unpaired file tokenized: examples as above, in file order."""
    path: Path
    examples: list[dict]
    n_records: int
    n_desirable: int  # kept examples labelled true
    n_undesirable: int  # kept examples labelled false
    n_truncated: int  # examples with a row cut to max_seq_len (and kept)
    n_dropped: int  # examples whose completion row has no trained token left, not in `examples`
    examples_per_s: float
    max_seq_len: int

    @property
    def lengths(self) -> list[int]:
        """The longer row of each example: the completion row or its KL row."""
        return [max(len(e["completion_ids"]), len(e["kl_ids"])) for e in self.examples]

    def summary(self) -> str:
        tokens = sum(len(e["completion_ids"]) for e in self.examples)
        trained = sum(trained_count(e["completion_labels"]) for e in self.examples)
        return (f"{self.path}: {len(self.examples)} completions of {self.n_records} "
                f"({self.n_desirable} desirable, {self.n_undesirable} undesirable), {tokens} tokens, "
                f"{trained} trained (the completions), and {len(self.examples)} KL rows (each prompt with "
                f"the previous record's completion); {self.n_truncated} truncated to {self.max_seq_len}, "
                f"{self.n_dropped} dropped (a completion with no trained token left); "
                f"{self.examples_per_s:,.0f} examples/s")


def is_unpaired_file(path: str | Path) -> bool:
    """Whether the file's first record has the unpaired fields (for data.inspect)."""
    records = read_records(Path(path))
    return bool(records) and isinstance(records[0][1], dict) and set(FIELDS) <= set(records[0][1])


def _label(value, from_csv: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_csv and isinstance(value, str) and value.strip().lower() in CSV_LABELS:
        return CSV_LABELS[value.strip().lower()]
    expected = "true or false" if from_csv else "true or false (a JSON bool)"
    raise RecordError(f"field 'label' must be {expected}, got {json.dumps(value)}")


def to_unpaired(record, from_csv: bool = False) -> tuple[list[dict], list[dict], bool]:
    """(prompt messages, completion messages, label) of one record; from_csv: the label may be
    the strings "true"/"false" (any case), since a CSV cell has no bool."""
    if not isinstance(record, dict):
        raise RecordError(f"expected an object with fields, got {type(record).__name__}")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        found = ", ".join(sorted(map(str, record))) or "none"
        raise RecordError(f"an unpaired (KTO) record needs prompt, completion and label; missing "
                          f"{', '.join(missing)} (fields found: {found})")
    prompt = [m for m in _messages(record["prompt"], "prompt", "user", None)
              if not (m["role"] == "system" and not m["content"].strip())]
    return (prompt, _messages(record["completion"], "completion", None, "assistant"),
            _label(record["label"], from_csv))


def load_unpaired(path: str | Path) -> list[tuple[int, tuple]]:
    """(line, (prompt, completion, label)) for every record of an unpaired file."""
    path = Path(path)
    return convert_records(path, partial(to_unpaired, from_csv=path.suffix.lower() == ".csv"))


def _rows(path: Path, tok, records: list) -> list[tuple[list, list]]:
    """(ids, labels) untruncated, two per record: its completion row, then its KL row (its prompt
    with the previous record's completion, cyclic)."""
    texts, spans = [], []
    for k, (line, (prompt, completion, _)) in enumerate(records):
        previous = records[k - 1][1][1]  # k = 0: records[-1], the last record
        try:
            for reply in (completion, previous):
                text, span = reply_labels(tok, prompt, reply)
                texts.append(text)
                spans.append(span)
        except RecordError as e:
            raise DataError(f"{path}:{line}: {e}") from None
        except jinja2.TemplateError as e:
            raise DataError(f"{path}:{line}: chat template error: {e}") from None
    return [(ids, mask_labels(ids, offsets, span, tok.stop_ids)[0])
            for (ids, offsets), span in zip(tok.encode_rendered(texts), spans)]


def tokenize_unpaired(path: str | Path, tok, max_seq_len: int) -> UnpairedData:
    """Tokenize an unpaired file: each record's completion row and KL row, truncated to max_seq_len
    (keeping the start, as SFT does). An example whose completion row is left with nothing to train
    is dropped and counted; a KL row with nothing to train is kept (its log-prob is 0)."""
    start = time.perf_counter()
    path = Path(path)
    records = load_unpaired(path)
    if len(records) < 2:
        raise DataError(f"{path}: 1 record; KTO's KL estimate pairs each prompt with another record's "
                        "completion, so it needs at least 2 records")
    rows = _rows(path, tok, records)
    examples, n_truncated, n_dropped = [], 0, 0
    for k, (line, (_, _, label)) in enumerate(records):
        (ids, labels), (kl_ids, kl_labels) = rows[2 * k], rows[2 * k + 1]
        if trained_count(labels[:max_seq_len]) == 0:
            n_dropped += 1
            continue
        truncated = max(len(ids), len(kl_ids)) > max_seq_len
        n_truncated += truncated
        examples.append({"completion_ids": ids[:max_seq_len], "completion_labels": labels[:max_seq_len],
                         "kl_ids": kl_ids[:max_seq_len], "kl_labels": kl_labels[:max_seq_len],
                         "desirable": label, "line": line, "truncated": truncated})
    if not examples:
        raise DataError(f"{path}: all {len(records)} examples dropped: no completion has a trained token "
                        f"within max_seq_len={max_seq_len}")
    n_desirable = sum(e["desirable"] for e in examples)
    rate = len(records) / max(time.perf_counter() - start, 1e-9)
    return UnpairedData(path, examples, len(records), n_desirable, len(examples) - n_desirable,
                        n_truncated, n_dropped, rate, max_seq_len)


def make_unpaired_batch(examples: list[dict], idx: list[int], pad_id: int) -> dict:
    """The batch of examples idx: input_ids, labels, attention_mask (B, T) the completion rows,
    kl_input_ids, kl_labels (B, T') the KL rows, each right-padded (data.collate); desirable (B,)
    bool; `examples` is B. With reference log-probs precomputed (`ref_completion`, `ref_kl` in the
    examples), `ref_logps` (2B,) float64: the B completions' values, then the B KL rows'."""
    batch = collate([{"input_ids": examples[i]["completion_ids"], "labels": examples[i]["completion_labels"]}
                     for i in idx], pad_id)
    kl = collate([{"input_ids": examples[i]["kl_ids"], "labels": examples[i]["kl_labels"]} for i in idx], pad_id)
    # KL rows are right-padded like the completion rows: causal attention needs no mask for them
    batch["kl_input_ids"], batch["kl_labels"] = kl["input_ids"], kl["labels"]
    batch["desirable"] = torch.tensor([examples[i]["desirable"] for i in idx], dtype=torch.bool)
    batch["examples"] = len(idx)
    if idx and "ref_completion" in examples[idx[0]]:
        batch["ref_logps"] = torch.tensor([examples[i]["ref_completion"] for i in idx] +
                                          [examples[i]["ref_kl"] for i in idx], dtype=torch.float64)
    return batch
