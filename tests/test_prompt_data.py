"""GRPO's prompt data (data/prompts.py) against transformers' apply_chat_template.

- A prompt's ids are apply_chat_template(messages, add_generation_prompt=True); standard,
  conversational and CSV records read alike, and every other field is kept for the rewards (None in
  a record that lacks it).
- A prompt longer than max_prompt_len is dropped and counted, never cut; bad records fail with one
  line naming path:line; is_prompt_file tells prompt files from preference, unpaired and SFT files.
- The shipped examples/arithmetic*.jsonl hold right answers and share no question.
"""

import re

import pytest

import data
from conftest import ROOT
from test_dpo import write_jsonl
from test_kto_data import hf, tok  # noqa: F401 (fixtures)

RECORDS = [
    {"prompt": "What is 17 + 25? Answer with the number only.", "answer": "42", "level": 1},
    {"prompt": [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}],
     "answer": "green", "tags": ["colour"]},
    {"prompt": [{"role": "system", "content": "  "}, {"role": "user", "content": "Say hello in French."}]},
]


def test_prompts_tokenize_as_apply_chat_template_with_the_generation_prompt(tmp_path, tok, hf):
    ds = data.tokenize_prompts(write_jsonl(tmp_path / "p.jsonl", RECORDS), tok, max_prompt_len=512)
    assert ds.n_records == 3 and ds.n_dropped == 0 and [e["line"] for e in ds.examples] == [1, 2, 3]
    messages = [[{"role": "user", "content": RECORDS[0]["prompt"]}], RECORDS[1]["prompt"],
                [RECORDS[2]["prompt"][1]]]  # the blank system prompt dropped, as DPO's prompts drop it
    for e, m in zip(ds.examples, messages):
        assert e["prompt"] == m and e["prompt_text"] == m[-1]["content"]
        assert e["prompt_ids"] == hf.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False)
        assert e["prompt_ids"] == tok.encode_chat(m, add_generation_prompt=True)
    assert hf.decode(ds.examples[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")
    # every field of any record, in every example: None where a record lacks it
    assert [e["fields"] for e in ds.examples] == [
        {"answer": "42", "level": 1, "tags": None},
        {"answer": "green", "level": None, "tags": ["colour"]},
        {"answer": None, "level": None, "tags": None}]
    assert ds.lengths == [len(e["prompt_ids"]) for e in ds.examples]
    summary = ds.summary()
    assert "\n" not in summary and "3 prompts of 3" in summary and "fields for the rewards: answer, level, tags" in summary
    assert data.load_prompts(tmp_path / "p.jsonl")[0] == (1, messages[0], {"answer": "42", "level": 1})


def test_csv_records_keep_their_columns_as_fields(tmp_path, tok, hf):
    path = tmp_path / "p.csv"
    path.write_text('prompt,answer,source\n"What is 2 + 2? Say it, in digits.",4,made up\nName a colour.,,\n')
    ds = data.tokenize_prompts(path, tok, 512)
    assert [e["line"] for e in ds.examples] == [2, 3]
    assert [e["fields"] for e in ds.examples] == [{"answer": "4", "source": "made up"},
                                                   {"answer": None, "source": None}]  # empty cells: absent
    assert ds.examples[0]["prompt_text"] == "What is 2 + 2? Say it, in digits."
    assert ds.examples[1]["prompt_ids"] == hf.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert data.is_prompt_file(path)


def test_too_long_prompts_are_dropped_and_counted_never_cut(tmp_path, tok):
    rows = [RECORDS[0], {"prompt": "Tell me a story. " * 40, "answer": "x"}, RECORDS[2]]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    full = data.tokenize_prompts(path, tok, 512)
    limit = max(full.lengths[0], full.lengths[2])
    assert full.lengths[1] > limit
    ds = data.tokenize_prompts(path, tok, max_prompt_len=limit)
    assert ds.n_records == 3 and ds.n_dropped == 1 and [e["line"] for e in ds.examples] == [1, 3]
    assert ds.examples[0]["prompt_ids"] == full.examples[0]["prompt_ids"]
    assert f"1 dropped (longer than max_prompt_len={limit})" in ds.summary()
    with pytest.raises(data.DataError, match=r"long.jsonl: all 3 prompts dropped: none fits in max_prompt_len=3"):
        data.tokenize_prompts(path, tok, max_prompt_len=3)


@pytest.mark.parametrize("record, message", [
    ({"answer": "42"}, r"a prompt record needs a prompt field \(fields found: answer\)"),
    ({"question": "hi", "answer": "42"}, r"needs a prompt field \(fields found: answer, question\)"),
    ({"prompt": ""}, "field 'prompt' is empty"),
    ({"prompt": 42}, "field 'prompt' must be a string or a non-empty list of messages"),
    ({"prompt": []}, "field 'prompt' must be a string or a non-empty list of messages"),
    ({"prompt": [{"role": "user"}]}, "prompt message 1 must be"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "must end with a user message, not assistant"),
    ({"prompt": "hi", "completions": ["a"]}, "field 'completions' is reserved: reward functions get prompts"),
    ({"prompt": "hi", "prompts": "a"}, "field 'prompts' is reserved"),
    (["hi"], "expected an object with fields, got list"),
])
def test_bad_records_name_the_file_and_line(tmp_path, tok, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], record])
    with pytest.raises(data.DataError, match=rf"bad.jsonl:2: .*{message}") as e:
        data.tokenize_prompts(path, tok, 512)
    assert "\n" not in str(e.value)


def test_is_prompt_file_tells_the_kinds_of_file_apart(tmp_path):
    assert data.is_prompt_file(write_jsonl(tmp_path / "p.jsonl", RECORDS))
    assert data.is_prompt_file(ROOT / "examples" / "arithmetic.jsonl")
    for name in ("preferences.jsonl", "kto.jsonl", "train.json"):  # DPO, KTO, SFT
        assert not data.is_prompt_file(ROOT / "examples" / name), name
    assert not data.is_prompt_file(write_jsonl(tmp_path / "list.jsonl", [["prompt"]]))
    assert not data.is_preference_file(tmp_path / "p.jsonl") and not data.is_unpaired_file(tmp_path / "p.jsonl")


def test_the_arithmetic_examples_hold_right_answers():
    questions = {}
    for name, n in (("arithmetic.jsonl", 64), ("arithmetic_val.jsonl", 16)):
        records = data.load_prompts(ROOT / "examples" / name)
        assert len(records) == n
        for _, prompt, fields in records:
            a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", prompt[0]["content"]).groups()
            assert 2 <= int(a) <= 60 and 2 <= int(b) <= 60
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert set(fields) == {"answer"} and fields["answer"] == str(value) and value >= 0
            questions.setdefault(name, set()).add(f"{a} {op} {b}")
        assert len(questions[name]) == n  # no question twice in a file
    assert not questions["arithmetic.jsonl"] & questions["arithmetic_val.jsonl"]
