"""KTO's unpaired data (data/unpaired.py) against transformers' apply_chat_template.

- A completion row is apply_chat_template(prompt + completion), and only the completion's tokens and
  its end-of-turn token train, never the prompt (a system prompt and earlier assistant turns included).
- Record i's KL row is record i's prompt with record i-1's completion (record 0 with the last
  record's), masked the same way; the pairing follows the file's records, dropped ones included.
- Standard, conversational and CSV records read alike; a label is a JSON bool, in CSV "true"/"false".
- Bad records and a one-record file fail with one line naming path:line; truncation and dropping are
  counted; a batch holds the completion rows, the KL rows beside them and the labels, in order.
"""


import pytest
import torch

import data
from data.unpaired import to_unpaired
from model.loss import IGNORE_INDEX
from test_dpo import write_jsonl

RECORDS = [
    {"prompt": "What is 2 plus 2?", "completion": "Ahoy! 2 plus 2 is 4. Fair winds!", "label": True},
    {"prompt": [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Ahoy! Blue. Fair winds!"},
                {"role": "user", "content": "Another one?"}],
     "completion": [{"role": "assistant", "content": "Green, I suppose, if you insist on another one."}],
     "label": False},
    {"prompt": [{"role": "user", "content": "Say hello in French."}],
     "completion": [{"role": "assistant", "content": "Ahoy! Bonjour. Fair winds!"}], "label": True},
]


@pytest.fixture(scope="module")
def tok(tiny_chat_dir):
    return data.load_tokenizer(tiny_chat_dir, None)


@pytest.fixture(scope="module")
def hf(tiny_chat_dir):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(tiny_chat_dir)


def assert_only_reply_trains(hf, ids, labels, prompt, reply):
    """ids are apply_chat_template(prompt + reply); the trained tokens are exactly those after
    apply_chat_template(prompt, add_generation_prompt=True), through the end-of-turn token."""
    prefix = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == hf.apply_chat_template(prompt + reply, tokenize=True, return_dict=False)
    trained = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
    assert trained == list(range(len(prefix), trained[-1] + 1))  # one span, right after the prompt
    assert labels[trained[-1]] == hf.convert_tokens_to_ids("<|im_end|>")
    assert hf.decode([ids[i] for i in trained[:-1]]) == reply[0]["content"]
    assert all(labels[i] == ids[i] for i in trained)


def test_rows_tokenize_as_apply_chat_template_and_kl_rows_take_the_previous_completion(tmp_path, tok, hf):
    ds = data.tokenize_unpaired(write_jsonl(tmp_path / "kto.jsonl", RECORDS), tok, max_seq_len=512)
    assert len(ds.examples) == 3 and ds.n_dropped == ds.n_truncated == 0
    assert (ds.n_desirable, ds.n_undesirable) == (2, 1) and "2 desirable, 1 undesirable" in ds.summary()
    parsed = [to_unpaired(r) for r in RECORDS]
    for k, e in enumerate(ds.examples):
        prompt, completion, label = parsed[k]
        assert e["desirable"] is label and e["line"] == k + 1
        assert_only_reply_trains(hf, e["completion_ids"], e["completion_labels"], prompt, completion)
        previous = parsed[k - 1][1]  # k = 0: the last record's completion
        assert_only_reply_trains(hf, e["kl_ids"], e["kl_labels"], prompt, previous)
    assert ds.lengths == [max(len(e["completion_ids"]), len(e["kl_ids"])) for e in ds.examples]


def test_csv_labels_are_true_or_false_in_any_case(tmp_path, tok):
    path = tmp_path / "kto.csv"
    path.write_text('prompt,completion,label\nWhat is 2 plus 2?,"Ahoy! 4, of course. Fair winds!",TRUE\n'
                    "Name a colour.,Green.,false\n")
    ds = data.tokenize_unpaired(path, tok, 512)
    assert [e["desirable"] for e in ds.examples] == [True, False] and [e["line"] for e in ds.examples] == [2, 3]
    assert data.is_unpaired_file(path) and not data.is_preference_file(path)
    path.write_text("prompt,completion,label\nhi,a,true\nho,b,yes\n")
    with pytest.raises(data.DataError, match=r"kto.csv:3: field 'label' must be true or false, got \"yes\""):
        data.tokenize_unpaired(path, tok, 512)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "hi", "completion": "a"}, r"missing label \(fields found: completion, prompt\)"),
    ({"prompt": "hi", "completion": "a", "label": "yes"}, "'label' must be true or false \\(a JSON bool\\)"),
    ({"prompt": "hi", "completion": "a", "label": "true"}, "'label' must be true or false \\(a JSON bool\\)"),
    ({"prompt": "hi", "completion": "a", "label": 1}, "'label' must be true or false"),
    ({"prompt": "hi", "completion": "", "label": True}, "'completion' is empty"),
    ({"prompt": "hi", "completion": [{"role": "user", "content": "a"}], "label": True}, "a reply's messages are"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "completion": "a",
      "label": False}, "must end with a user message"),
])
def test_bad_records_name_the_file_and_line(tmp_path, tok, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], record])
    with pytest.raises(data.DataError, match=rf"bad.jsonl:2: .*{message}") as e:
        data.tokenize_unpaired(path, tok, 512)
    assert "\n" not in str(e.value)


def test_one_record_is_refused(tmp_path, tok):
    with pytest.raises(data.DataError, match=r"one.jsonl: 1 record; KTO's KL estimate .* at least 2 records"):
        data.tokenize_unpaired(write_jsonl(tmp_path / "one.jsonl", RECORDS[:1]), tok, 512)


def test_truncation_and_dropping_are_counted(tmp_path, tok, hf):
    """A long prompt leaves record 2's completion no room: it is dropped, but record 3's KL row
    still takes its completion (pairs follow the file). Record 1's KL row (record 3's long
    completion) is cut and counted."""
    long_prompt, long_reply = "Tell me a story. " * 40, "Ahoy! " + "Once upon a time. " * 40
    rows = [RECORDS[0], {"prompt": long_prompt, "completion": "Too late.", "label": False},
            {"prompt": "Say hi.", "completion": long_reply, "label": True}]
    prompt_len = len(hf.apply_chat_template([{"role": "user", "content": long_prompt}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False))
    ds = data.tokenize_unpaired(write_jsonl(tmp_path / "cut.jsonl", rows), tok, max_seq_len=prompt_len)
    assert ds.n_dropped == 1 and ds.n_records == 3 and [e["line"] for e in ds.examples] == [1, 3]
    assert ds.n_truncated == 2 and all(e["truncated"] for e in ds.examples)
    assert all(len(e[k]) <= prompt_len for e in ds.examples for k in ("completion_ids", "kl_ids"))
    kl = ds.examples[1]  # "Say hi." with the dropped record's "Too late."
    assert "Too late." in hf.decode(kl["kl_ids"]) and data.trained_count(kl["kl_labels"]) > 0
    with pytest.raises(data.DataError, match=r"cut.jsonl: all 3 examples dropped"):
        data.tokenize_unpaired(tmp_path / "cut.jsonl", tok, max_seq_len=3)


def test_a_batch_holds_completion_rows_kl_rows_labels_and_reference_logps(tmp_path, tok):
    ds = data.tokenize_unpaired(write_jsonl(tmp_path / "kto.jsonl", RECORDS), tok, max_seq_len=512)
    batch = data.make_unpaired_batch(ds.examples, [2, 1], pad_id=0)
    assert batch["examples"] == 2 and batch["desirable"].tolist() == [True, False]
    assert "ref_logps" not in batch and "kl_attention_mask" not in batch
    for prefix, key in (("", "completion"), ("kl_", "kl")):
        ids, labels = batch[f"{prefix}input_ids"], batch[f"{prefix}labels"]
        assert ids.shape == labels.shape and ids.shape[0] == 2
        assert ids.shape[1] == max(len(ds.examples[i][f"{key}_ids"]) for i in (2, 1))
        for row, i in enumerate((2, 1)):
            n = len(ds.examples[i][f"{key}_ids"])
            assert ids[row, :n].tolist() == ds.examples[i][f"{key}_ids"]
            assert labels[row, :n].tolist() == ds.examples[i][f"{key}_labels"]
            assert (ids[row, n:] == 0).all() and (labels[row, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(ds.examples[i]["completion_ids"]) for i in (2, 1)]
    examples = [{**e, "ref_completion": -1.0 - k, "ref_kl": -10.0 - k} for k, e in enumerate(ds.examples)]
    ref = data.make_unpaired_batch(examples, [2, 1], pad_id=0)["ref_logps"]
    assert ref.dtype == torch.float64 and ref.tolist() == [-3.0, -2.0, -12.0, -11.0]
