"""Data files to conversations: every record becomes a list of {"role", "content"} messages.

Files: `.json` (an array of records, or one record per line), `.jsonl`, `.csv`, and `.txt` for
continued pre-training: plain text, each paragraph (the text between blank lines) one document, a
{"text": ...} record, as datasets' text loader reads a file with sample_by="paragraph". The format of
a record is detected from its fields:

    conversation   EmoLLM / XTuner: [{"system"|"instruction"?, "input", "output"}, ...], one record
                   is one multi-turn dialogue, the system prompt on the first turn
    conversations  ShareGPT: [{"from": "system"|"human"|"gpt", "value"}, ...] (or "role"/"content" keys)
    messages       OpenAI: [{"role": "system"|"user"|"assistant", "content"}, ...]; an assistant
                   message with "weight": 0 is context, not trained (1, the default, trains it)
    instruction + output   Alpaca (optional input, system, history [[user, assistant], ...]);
                   the user message is instruction + "\\n" + input, as LLaMA-Factory builds it
    question + answer      one exchange
    text           continued pre-training: [{"role": "text", "content"}], every token trained

A message keeps "weight": 0 when its record gave it (OpenAI's and ShareGPT's "weight" key); the
masks in masking.py then leave that reply untrained.

Bad input raises DataError with one line naming the file and the line of the record.
"""

import csv
import io
import json
from pathlib import Path

from model.errors import UserError

TEXT_ROLE = "text"  # a plain-text record: no template, every token is trained
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
EXPECTED = ("conversation (EmoLLM) | conversations (ShareGPT) | messages (OpenAI) | "
            "instruction+output (Alpaca) | question+answer | text")
SUFFIXES = (".json", ".jsonl", ".csv", ".txt")


class DataError(UserError, ValueError):
    """Unusable input; the message is one line naming the file (and line)."""


# --- reading records ---------------------------------------------------------------------------

def check_file(path: Path):
    """Refuse a path that names no file: missing, or a directory."""
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a data file ({', '.join(SUFFIXES)}); name a file in it")
    if not path.is_file():
        raise DataError(f"{path}: no such file")


def read_text(path: Path) -> str:
    check_file(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type; expected {', '.join(SUFFIXES)}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark is not part of the data
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def read_records(path: Path) -> list[tuple[int, object]]:
    """(line number, record) for every record of the file, in file order."""
    text = read_text(path)
    suffix, start = path.suffix.lower(), text.lstrip()[0]
    if suffix == ".csv":
        return _csv_records(path, text)
    if suffix == ".txt":
        return _paragraph_records(text)
    if suffix == ".json" and start == "[":
        return _json_array_records(path, text)
    if suffix == ".json" and start == "{":  # one pretty-printed record, or JSON Lines named .json
        try:
            return [(1, json.loads(text))]
        except json.JSONDecodeError:
            pass
    return _jsonl_records(path, text)


def _jsonl_records(path: Path, text: str) -> list[tuple[int, object]]:
    records = []
    # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 and other characters that
    # JSON allows raw inside a string.
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})") from None
    return records


def _json_array_records(path: Path, text: str) -> list[tuple[int, object]]:
    try:
        json.loads(text)  # validates the whole file, with the exact line of any syntax error
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    # Decode again element by element, to know the line each record starts on.
    decoder, records = json.JSONDecoder(), []
    pos, line, counted = text.index("[") + 1, 1, 0
    while True:
        pos = _skip(text, pos, ",")
        if text[pos] == "]":
            return records
        line += text.count("\n", counted, pos)
        counted = pos
        record, pos = decoder.raw_decode(text, pos)
        records.append((line, record))


def _paragraph_records(text: str) -> list[tuple[int, dict]]:
    """A plain-text file's documents: its paragraphs, runs of lines that are not blank, each a
    {"text"} record at the line it starts on (its lines joined by newlines, as written)."""
    records, lines = [], []
    for n, line in enumerate(text.split("\n") + [""], start=1):
        if line.strip():
            lines.append((n, line.rstrip("\r")))
        elif lines:
            records.append((lines[0][0], {"text": "\n".join(line for _, line in lines)}))
            lines = []
    return records


def _skip(text: str, pos: int, chars: str) -> int:
    while text[pos].isspace() or text[pos] in chars:
        pos += 1
    return pos


def _csv_records(path: Path, text: str) -> list[tuple[int, object]]:
    reader = csv.DictReader(io.StringIO(text))
    records, line = [], 2  # the header is line 1
    try:
        for row in reader:
            # DictReader puts cells past the header under None and gives None for missing ones
            if None in row or None in row.values():
                cells = len(row) - 1 + len(row[None]) if None in row else sum(v is not None for v in row.values())
                raise DataError(f"{path}:{line}: {cells} cells where the header has {len(reader.fieldnames)} "
                                "(a comma inside a cell needs the cell in double quotes)")
            # Empty cells are absent fields (an Alpaca row with no input).
            records.append((line, {k: v for k, v in row.items() if k and v != ""}))
            line = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV ({e})") from None
    return records


# --- records to messages -----------------------------------------------------------------------

class RecordError(ValueError):
    """A problem with one record; load_conversations adds the file and line."""


def _text(record: dict, key: str, optional: bool = False) -> str | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _list(record: dict, key: str) -> list:
    value = record[key]
    if not isinstance(value, list) or not value:
        raise RecordError(f"field {key!r} must be a non-empty list")
    return value


def _turns(turns: list, item_type: str) -> list[dict]:
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{item_type} {i + 1} must be an object, got {type(turn).__name__}")
    return turns


def from_emollm(record: dict) -> list[dict]:
    messages = []
    for i, turn in enumerate(_turns(_list(record, "conversation"), "turn")):
        system = _text(turn, "system", optional=True) or _text(turn, "instruction", optional=True)
        if system and i == 0:
            messages.append({"role": "system", "content": system})
        elif system:
            raise RecordError(f"turn {i + 1} has a system prompt; only the first turn may")
        messages.append({"role": "user", "content": _text(turn, "input")})
        messages.append({"role": "assistant", "content": _text(turn, "output")})
    return messages


def from_sharegpt(record: dict) -> list[dict]:
    messages = []
    for i, turn in enumerate(_turns(_list(record, "conversations"), "turn")):
        # "from"/"value" as ShareGPT writes them; many files use OpenAI's "role"/"content" instead
        speaker = turn.get("from", turn.get("role"))
        if speaker not in SHAREGPT_ROLES:
            raise RecordError(f"turn {i + 1}: unknown role {speaker!r}; expected one of "
                              f"{', '.join(SHAREGPT_ROLES)}")
        text = _text(turn, "value" if "value" in turn or "content" not in turn else "content")
        messages.append(_weighted({"role": SHAREGPT_ROLES[speaker], "content": text}, turn, f"turn {i + 1}"))
    return messages


def from_openai(record: dict) -> list[dict]:
    messages = []
    for i, message in enumerate(_turns(_list(record, "messages"), "message")):
        if message.get("role") not in ROLES:
            raise RecordError(f"message {i + 1}: unknown role {message.get('role')!r}; expected one "
                              f"of {', '.join(ROLES)}")
        messages.append(_weighted({"role": message["role"], "content": _text(message, "content")}, message,
                                  f"message {i + 1}"))
    return messages


def _weighted(message: dict, source: dict, where: str) -> dict:
    """The message with the record's "weight" (OpenAI's fine-tuning format): 0 on an assistant
    message means it is context only, not trained; 1 trains it, as no weight does."""
    if "weight" not in source:
        return message
    weight = source["weight"]
    if isinstance(weight, bool) or weight not in (0, 1):
        raise RecordError(f"{where}: weight must be 0 (do not train) or 1 (train), got {json.dumps(weight)}")
    if message["role"] != "assistant":
        raise RecordError(f"{where}: weight is for assistant messages, this one is {message['role']}")
    return {**message, "weight": int(weight)}


def from_alpaca(record: dict) -> list[dict]:
    messages = []
    system = _text(record, "system", optional=True)
    if system:
        messages.append({"role": "system", "content": system})
    for i, pair in enumerate(record.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise RecordError(f"history item {i + 1} must be [user, assistant] strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = _text(record, "instruction")
    extra = _text(record, "input", optional=True)
    if extra:
        user = f"{user}\n{extra}"
    return messages + [{"role": "user", "content": user},
                       {"role": "assistant", "content": _text(record, "output")}]


def from_qa(record: dict) -> list[dict]:
    return [{"role": "user", "content": _text(record, "question")},
            {"role": "assistant", "content": _text(record, "answer")}]


def from_text(record: dict) -> list[dict]:
    text = _text(record, "text")
    if not text.strip():
        raise RecordError("empty text")
    return [{"role": TEXT_ROLE, "content": text}]


def to_messages(record) -> list[dict]:
    """One record as messages, in the format its fields say (checked in this order)."""
    if not isinstance(record, dict):
        raise RecordError(f"expected an object with fields, got {type(record).__name__}")
    fields = set(record)
    if "conversation" in fields:
        messages = from_emollm(record)
    elif "conversations" in fields:
        messages = from_sharegpt(record)
    elif "messages" in fields:
        messages = from_openai(record)
    elif {"instruction", "output"} <= fields:
        messages = from_alpaca(record)
    elif {"question", "answer"} <= fields:
        messages = from_qa(record)
    elif "text" in fields:
        return from_text(record)
    else:
        found = ", ".join(sorted(map(str, fields))) or "none"
        raise RecordError(f"unrecognised record: fields found: {found}; expected {EXPECTED}")
    return check_messages(messages)


def check_messages(messages: list[dict]) -> list[dict]:
    """Drop empty system prompts; refuse empty replies, which would teach the model to say nothing."""
    messages = [m for m in messages if not (m["role"] == "system" and not m["content"].strip())]
    if not messages:
        raise RecordError("no messages")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise RecordError(f"empty assistant reply (message {i + 1})")
    return messages


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Every record of a data file as a list of {"role", "content"} messages."""
    return [messages for _, messages in load_conversations_with_lines(path)]


def load_conversations_with_lines(path: str | Path) -> list[tuple[int, list[dict]]]:
    """(line number, messages) for every record, in file order."""
    return convert_records(path, to_messages)


def convert_records(path: str | Path, convert) -> list[tuple[int, object]]:
    """(line number, convert(record)) for every record of the file, in file order; a RecordError
    from convert becomes a DataError naming the file and the record's line."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    out = []
    for line, record in records:
        try:
            out.append((line, convert(record)))
        except RecordError as e:
            raise DataError(f"{path}:{line}: {e}") from None
    return out
