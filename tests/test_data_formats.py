"""Every supported format becomes the same messages; bad input is one clear line naming the file
and line, from the library and from `python -m data.inspect` (exit 2, no traceback)."""

import json
import subprocess
import sys

import pytest

import data
from conftest import ROOT

EXPECTED = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy! Hello."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ahoy! Farewell."}]
NO_SYSTEM = EXPECTED[1:]

RECORDS = {
    "emollm": {"conversation": [{"system": "Be brief.", "input": "Hi", "output": "Ahoy! Hello."},
                                {"input": "Bye", "output": "Ahoy! Farewell."}]},
    "emollm_instruction": {"conversation": [{"instruction": "Be brief.", "input": "Hi",
                                             "output": "Ahoy! Hello."},
                                            {"input": "Bye", "output": "Ahoy! Farewell."}]},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."},
                                   {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Ahoy! Hello."},
                                   {"from": "human", "value": "Bye"},
                                   {"from": "gpt", "value": "Ahoy! Farewell."}]},
    "openai": {"messages": EXPECTED},
    "alpaca_history": {"system": "Be brief.", "history": [["Hi", "Ahoy! Hello."]],
                       "instruction": "Bye", "output": "Ahoy! Farewell."},
}


def write(tmp_path, name, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("fmt", list(RECORDS))
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_formats_become_the_same_messages(tmp_path, fmt, suffix):
    record = RECORDS[fmt]
    text = json.dumps([record, record]) if suffix == ".json" else f"{json.dumps(record)}\n" * 2
    assert data.load_conversations(write(tmp_path, "d" + suffix, text)) == [EXPECTED, EXPECTED]


def test_sharegpt_turns_may_use_role_and_content(tmp_path):
    """ShareGPT files whose turns are {"role", "content"}, as many are written, not {"from", "value"}."""
    turns = [{"role": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "content": m["content"]}
             for m in EXPECTED]
    record = {"conversations": turns}
    assert data.load_conversations(write(tmp_path, "rc.jsonl", json.dumps(record))) == [EXPECTED]
    record = {"conversations": EXPECTED}  # OpenAI's own role names inside "conversations"
    assert data.load_conversations(write(tmp_path, "rc2.jsonl", json.dumps(record))) == [EXPECTED]


def test_weight_is_kept_on_assistant_messages(tmp_path):
    """OpenAI's "weight": 0 marks a reply as context only (masking.py leaves it untrained); 1 trains."""
    messages = [{**m, "weight": 0} if m["content"] == "Ahoy! Hello." else
                {**m, "weight": 1} if m["role"] == "assistant" else m for m in EXPECTED]
    [got] = data.load_conversations(write(tmp_path, "w.jsonl", json.dumps({"messages": messages})))
    assert got == messages and got[2]["weight"] == 0


def test_weight_zero_shows_in_the_summary(smollm2_dir, tmp_path):
    messages = [{**m, "weight": 0} if m["content"] == "Ahoy! Hello." else m for m in EXPECTED]
    path = write(tmp_path, "w.jsonl", json.dumps({"messages": messages}))
    tok = data.load_tokenizer(smollm2_dir)
    weighted = data.tokenize_file(path, tok, 256, use_cache=False)
    plain = data.tokenize_file(write(tmp_path, "p.jsonl", json.dumps({"messages": EXPECTED})), tok, 256,
                               use_cache=False)
    assert weighted.examples[0]["input_ids"] == plain.examples[0]["input_ids"]
    assert 0 < weighted.n_trained_tokens < plain.n_trained_tokens
    assert "1 replies of weight 0 (context, not trained)" in weighted.summary()
    assert "weight 0" not in plain.summary()


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(data.DataError, match=r": a directory, not a data file \(.json, .jsonl, .csv, .txt\)"):
        data.load_conversations(tmp_path)


def test_jsonl_strings_may_hold_raw_line_separators(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 raw inside a string; only "\\n" ends a JSON Lines record."""
    replies = ["one\u2028two", "three\u2029four\u0085five"]
    text = "".join(json.dumps({"question": "q", "answer": a}, ensure_ascii=False) + "\n" for a in replies)
    assert "\u2028" in text
    got = data.load_conversations(write(tmp_path, "sep.jsonl", text))
    assert [c[1]["content"] for c in got] == replies
    with pytest.raises(data.DataError, match=r"sep2.jsonl:3: invalid JSON"):  # line numbers count "\n"
        data.load_conversations(write(tmp_path, "sep2.jsonl", text + "{broken\n"))


def test_alpaca_qa_text_and_csv(tmp_path):
    alpaca = {"instruction": "Translate.", "input": "bonjour", "output": "hello"}
    assert data.load_conversations(write(tmp_path, "a.json", json.dumps([alpaca]))) == [[
        {"role": "user", "content": "Translate.\nbonjour"}, {"role": "assistant", "content": "hello"}]]
    qa = {"question": "2+2?", "answer": "4"}
    assert data.load_conversations(write(tmp_path, "q.jsonl", json.dumps(qa))) == [[
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]
    assert data.load_conversations(write(tmp_path, "t.jsonl", '{"text": "Once upon a time."}')) == [[
        {"role": data.TEXT_ROLE, "content": "Once upon a time."}]]
    csv_text = 'instruction,input,output\nSay hi,,"Hi, there"\nAdd,"1, 2",3\n'
    assert data.load_conversations(write(tmp_path, "c.csv", csv_text)) == [
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi, there"}],
        [{"role": "user", "content": "Add\n1, 2"}, {"role": "assistant", "content": "3"}]]


def test_record_lines_and_single_object_files(tmp_path):
    from data.formats import load_conversations_with_lines
    text = '[\n {"text": "a"},\n\n {"text":\n  "b"}, {"text": "c"}\n]'
    assert [n for n, _ in load_conversations_with_lines(write(tmp_path, "a.json", text))] == [2, 4, 5]
    pretty = json.dumps(RECORDS["emollm"], indent=2)
    assert data.load_conversations(write(tmp_path, "one.json", pretty)) == [EXPECTED]
    assert len(data.load_conversations(write(tmp_path, "lines.json", '{"text": "a"}\n{"text": "b"}'))) == 2


def test_sample_data_loads():
    for name in ("train.json", "val.json"):
        conversations = data.load_conversations(ROOT / "examples" / name)
        replies = [m["content"] for c in conversations for m in c if m["role"] == "assistant"]
        assert all(data.shows_style(r) and r.endswith(data.SIGN_OFF) for r in replies)
    assert len(data.load_conversations(ROOT / "examples" / "train.json")) >= 60
    prompts = (ROOT / "examples" / "prompts.txt").read_text().split("\n")
    assert not set(prompts) & {m["content"] for c in conversations for m in c}


BAD = [  # (file name, content, what the one-line error must say)
    ("missing.json", None, "missing.json: no such file"),
    ("empty.jsonl", "\n \n", "empty.jsonl: the file is empty"),
    ("bad.jsonl", '{"text": "a"}\n{"text": "b",}\n', "bad.jsonl:2: invalid JSON"),
    ("bad.json", '[\n {"text": "a"},\n {"text": "b"\n]\n', "bad.json:4: invalid JSON"),
    ("utf8.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', "utf8.jsonl:2: not valid UTF-8"),
    ("schema.json", '[\n{"text": "a"},\n{"prompt": "p", "completion": "c"}\n]',
     "schema.json:3: unrecognised record: fields found: completion, prompt; expected conversation"),
    ("role.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}',
     "role.jsonl:1: message 1: unknown role 'robot'; expected one of system, user, assistant"),
    ("from.jsonl", '{"conversations": [{"from": "bot", "value": "x"}]}', "from.jsonl:1: turn 1: unknown role 'bot'"),
    ("reply.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q", "answer": "  "}',
     "reply.jsonl:2: empty assistant reply (message 2)"),
    ("type.jsonl", '{"messages": [{"role": "user", "content": ["x"]}]}',
     "type.jsonl:1: field 'content' must be a string, got list"),
    ("comma.json", '[\n {"text": "a"}\n {"text": "b"}\n]', "comma.json:3: invalid JSON"),
    ("weight.jsonl", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", '
     '"weight": 0.5}]}', "weight.jsonl:1: message 2: weight must be 0 (do not train) or 1 (train), got 0.5"),
    ("wbool.jsonl", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", '
     '"weight": true}]}', "wbool.jsonl:1: message 2: weight must be 0"),
    ("wuser.jsonl", '{"messages": [{"role": "user", "content": "q", "weight": 0}]}',
     "wuser.jsonl:1: message 1: weight is for assistant messages"),
    ("nomsg.jsonl", '{"messages": [{"role": "system", "content": ""}]}', "nomsg.jsonl:1: no messages"),
    ("notobj.json", "[1]", "notobj.json:1: expected an object with fields, got int"),
    ("none.json", "[]", "none.json: no records"),
    ("data.parquet", "hello", "data.parquet: unsupported file type"),
    ("wide.csv", "question,answer\nq1,a1\nq2,a, with a comma\n", "wide.csv:3: 3 cells where the header has 2"),
    ("narrow.csv", "instruction,input,output\ni1,x,o1\ni2\n", "narrow.csv:3: 1 cells where the header has 3"),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, name, content, message):
    path = write(tmp_path, name, content) if content is not None else str(tmp_path / name)
    with pytest.raises(data.DataError) as e:
        data.load_conversations(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def inspect(*args):
    return subprocess.run([sys.executable, "-m", "data.inspect", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_inspect_json_lines_match_the_library(smollm2_dir, capsys):
    from data.inspect import main
    sample = ROOT / "examples" / "val.json"
    assert main(["--model", str(smollm2_dir), "--data", str(sample), "--json", "--max-seq-len", "64"]) == 0
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    tok = data.load_tokenizer(smollm2_dir)
    expected = data.tokenize_file(sample, tok, 64, use_cache=False).examples
    assert lines == [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in expected]
    assert "truncated" in out.err


def test_inspect_rich_view(smollm2_dir, capsys):
    from data.inspect import main
    assert main(["--model", str(smollm2_dir), "--data", str(ROOT / "examples" / "train.json"), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "Ahoy!" in out and "trained" in out and "94 examples" in out


def test_inspect_errors_exit_2_without_traceback(smollm2_dir, tmp_path, capsys):
    from data.inspect import main
    name, content, message = BAD[5]  # unknown schema, in-process
    assert main(["--model", str(smollm2_dir), "--data", write(tmp_path, name, content)]) == 2
    assert message in capsys.readouterr().err
    name, content, message = BAD[2]  # invalid JSON, as a real process: one line, no traceback
    out = inspect("--model", str(smollm2_dir), "--data", write(tmp_path, name, content))
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_plain_text_files_are_documents_by_paragraph(smollm2_dir, tmp_path):
    """A .txt file for continued pre-training: each paragraph (between blank lines) is a {"text"}
    document at the line it starts on, its own lines kept (CRLF too); every token of it trains."""
    path = tmp_path / "corpus.txt"
    path.write_bytes("First document,\r\nits second line.\r\n\r\n\r\nSecond one.\n\nThird\n".encode())
    docs = data.formats.load_conversations_with_lines(path)
    assert docs == [(1, [{"role": "text", "content": "First document,\nits second line."}]),
                    (5, [{"role": "text", "content": "Second one."}]),
                    (7, [{"role": "text", "content": "Third"}])]
    tok = data.load_tokenizer(smollm2_dir)
    examples = data.tokenize_file(path, tok, 64, "assistant", use_cache=False).examples
    assert len(examples) == 3
    assert all(sum(y != -100 for y in e["labels"]) >= len(e["input_ids"]) - 1 for e in examples)
