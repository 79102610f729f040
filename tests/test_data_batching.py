"""Mask modes, truncation and dropping, the on-disk cache, validation splits, shuffling, padding and
packing: a packed row gives each example exactly the loss it has alone. The prefetcher gives its
iterator's items in order, at most `depth` ahead, raises its errors where they are read, and stops
its thread when closed."""

import json
import time

import pytest
import torch

import data
from model import Llama, LlamaConfig
from model.loss import lm_loss_sum

IGNORE = data.IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return data.load_tokenizer(smollm2_dir)


def two_turns(i=0):
    return {"messages": [{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": f"Ahoy! First answer {i}."},
                         {"role": "user", "content": "And then?"},
                         {"role": "assistant", "content": "Ahoy! Second answer."}]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def trained(tok, example) -> str:
    return tok.decode([i for i, y in zip(example["input_ids"], example["labels"]) if y != IGNORE])


def test_mask_modes(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [two_turns()])
    get = lambda mask: data.tokenize_file(path, tok, 512, mask, use_cache=False).examples[0]
    assert trained(tok, get("assistant")) == "Ahoy! First answer 0.<|im_end|>Ahoy! Second answer.<|im_end|>"
    assert trained(tok, get("last")) == "Ahoy! Second answer.<|im_end|>"
    everything = get("all")
    assert everything["labels"] == everything["input_ids"]
    assert tok.decode(everything["input_ids"]) == tok.render(two_turns()["messages"])


def test_plain_text_trains_every_token_and_ends_with_eos(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The sea was calm."}])
    [e] = data.tokenize_file(path, tok, 512, use_cache=False).examples
    assert e["input_ids"] == tok.encode("The sea was calm.") + [tok.eos_id]
    assert e["labels"] == e["input_ids"]


def test_truncation_and_dropping_are_counted(tok, tmp_path):
    long_prompt = {"question": "word " * 200, "answer": "Ahoy! Short."}
    path = write_jsonl(tmp_path / "d.jsonl", [two_turns(0), long_prompt, two_turns(2)])
    full = data.tokenize_file(path, tok, 4096, use_cache=False)
    assert (full.n_truncated, full.n_dropped, len(full.examples)) == (0, 0, 3)
    n = len(full.examples[0]["input_ids"])
    cut = data.tokenize_file(path, tok, n - 3, use_cache=False)  # cuts the end of the 2nd reply
    assert (cut.n_truncated, cut.n_dropped, len(cut.examples)) == (2, 1, 2)
    assert [e["line"] for e in cut.examples] == [1, 3]
    assert all(len(e["input_ids"]) == n - 3 and e["truncated"] for e in cut.examples)
    assert trained(tok, cut.examples[0]).startswith("Ahoy! First answer 0.<|im_end|>Ahoy!")
    assert "1 dropped" in cut.summary() and "2 truncated" in cut.summary()
    with pytest.raises(data.DataError, match="all 3 examples dropped"):
        data.tokenize_file(path, tok, 20, use_cache=False)


def test_template_without_end_of_turn_token_is_reported(smollm2_dir, tmp_path):
    tok = data.load_tokenizer(smollm2_dir, template="llama3")  # <|eot_id|> is not in SmolLM2's vocab
    path = write_jsonl(tmp_path / "d.jsonl", [two_turns()])
    result = data.tokenize_file(path, tok, 512, use_cache=False)
    assert result.n_unterminated == 2 and "will not learn to stop" in result.summary()
    # "<|eot_id|>" is plain text here; ".<" is one token overlapping the reply, so it trains.
    assert trained(tok, result.examples[0]) == "Ahoy! First answer 0.<Ahoy! Second answer.<"


def test_cache_is_reused_and_keyed(tok, smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [two_turns(i) for i in range(5)])
    cache = tmp_path / "cache"
    first = data.tokenize_file(path, tok, 512, cache_dir=cache)
    again = data.tokenize_file(path, tok, 512, cache_dir=cache)
    assert not first.from_cache and again.from_cache and again.examples == first.examples
    assert (again.n_records, again.n_dropped, again.mask) == (5, 0, "assistant")
    assert not data.tokenize_file(path, tok, 511, cache_dir=cache).from_cache
    assert not data.tokenize_file(path, tok, 512, "last", cache_dir=cache).from_cache
    deepseek = data.load_tokenizer(smollm2_dir, template="deepseek")
    assert not data.tokenize_file(path, deepseek, 512, cache_dir=cache).from_cache
    write_jsonl(path, [two_turns(i) for i in range(6)])
    assert len(data.tokenize_file(path, tok, 512, cache_dir=cache).examples) == 6
    assert all(f.suffix == ".safetensors" for f in cache.iterdir())


def test_split_validation_is_seeded_and_disjoint():
    examples = [{"id": i} for i in range(50)]
    train, val = data.split_validation(examples, 0.1, seed=0)
    assert len(val) == 5 and len(train) == 45
    assert sorted(e["id"] for e in train + val) == list(range(50))
    assert data.split_validation(examples, 0.1, seed=0) == (train, val)
    assert data.split_validation(examples, 0.1, seed=1)[1] != val
    assert data.split_validation(examples, 0.0, seed=0) == (examples, [])


# --- micro-batches -------------------------------------------------------------------------------

LENGTHS = [5, 17, 3, 30, 8, 8, 12, 1, 25, 9, 14, 2, 7]


@pytest.mark.parametrize("seed,epoch", [(0, 0), (0, 1), (3, 0)])
def test_order_does_not_depend_on_micro_batch_size(seed, epoch):
    orders = []
    for size in (1, 2, 3, 8, 13, 20):
        batches = data.micro_batches(LENGTHS, size, seed, epoch)
        assert all(len(b) == size for b in batches[:-1])
        orders.append([i for b in batches for i in b])
    assert all(o == orders[0] for o in orders)
    assert sorted(orders[0]) == list(range(len(LENGTHS)))


def test_shuffle_changes_with_seed_and_epoch():
    flat = lambda s, e: [i for b in data.micro_batches(LENGTHS, 4, s, e) for i in b]
    assert flat(0, 0) == flat(0, 0)
    assert flat(0, 0) != flat(0, 1) and flat(0, 0) != flat(1, 0)


def test_group_by_length_cuts_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    pad = lambda batches: sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b)
                              for b in batches)
    grouped = data.micro_batches(lengths, 8, 0, 0, group_by_length=True)
    plain = data.micro_batches(lengths, 8, 0, 0)
    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert pad(grouped) < pad(plain) / 4


def test_pack_rows_fit():
    batches = data.micro_batches(LENGTHS, 2, 0, 0, pack=True, max_seq_len=32)
    rows = [row for mb in batches for row in mb]
    assert all(len(mb) <= 2 for mb in batches)
    assert sorted(i for row in rows for i in row) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in row) <= 32 for row in rows)
    assert len(rows) == 5  # sum 141 tokens: 5 rows of 32 is the least possible
    with pytest.raises(ValueError, match="more than max_seq_len"):
        data.micro_batches(LENGTHS, 2, 0, 0, pack=True, max_seq_len=16)


# --- collate and packing ---------------------------------------------------------------------------

def example(ids, labels):
    return {"input_ids": ids, "labels": labels}


def test_collate_pads_right_with_masked_labels():
    eos = 2  # padding with EOS is safe: labels are -100 by position, the real EOS stays trained
    batch = data.collate([example([5, 6, 2], [-100, 6, 2]), example([7, 2], [-100, 2])], pad_id=eos)
    assert batch["input_ids"].tolist() == [[5, 6, 2], [7, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 2], [-100, 2, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert set(batch) == {"input_ids", "labels", "attention_mask"}


def test_collate_packed_rows():
    rows = [[example([5, 6, 2], [5, 6, 2]), example([7, 8], [7, 8])], [example([9], [9])]]
    batch = data.collate(rows, pad_id=0, pack=True)
    assert batch["input_ids"].tolist() == [[5, 6, 2, 7, 8], [9, 0, 0, 0, 0]]
    # the second example's first label would be predicted across the boundary: masked
    assert batch["labels"].tolist() == [[5, 6, 2, -100, 8], [9, -100, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


@pytest.mark.parametrize("mask", ["assistant", "all"])
def test_packed_row_loss_equals_the_examples_losses(tok, tmp_path, mask):
    records = [two_turns(i) for i in range(3)] + [{"question": "Why?", "answer": "Ahoy! Because."}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    examples = data.tokenize_file(path, tok, 512, mask, use_cache=False).examples
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=tok.tokenizer.get_vocab_size(), hidden_size=64,
                              intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)).double()
    alone = []
    for e in examples:
        b = data.collate([e], tok.pad_id)
        alone.append(lm_loss_sum(model, b["input_ids"], b["labels"]))
    rows = data.micro_batches([len(e["input_ids"]) for e in examples], 2, 0, 0, pack=True,
                              max_seq_len=sum(len(e["input_ids"]) for e in examples[:3]))[0]
    assert any(len(row) > 1 for row in rows)
    b = data.make_batch(examples, rows, tok.pad_id, pack=True)
    packed_loss, packed_n = lm_loss_sum(model, b["input_ids"], b["labels"], b["position_ids"],
                                        b["document_ids"])
    assert packed_n == sum(n for _, n in alone) == sum(data.trained_count(e["labels"]) for e in examples)
    # (lm_loss_sum takes the loss in fp32, so agreement is to fp32 rounding of the sums)
    torch.testing.assert_close(packed_loss, sum(loss for loss, _ in alone), rtol=1e-6, atol=0)
    # Without the block-diagonal mask the examples would see each other: the loss changes.
    leaky, _ = lm_loss_sum(model, b["input_ids"], b["labels"], b["position_ids"])
    assert not torch.allclose(leaky, packed_loss)


def test_prefetcher_gives_the_items_in_order_a_bounded_way_ahead():
    made = []

    def items():
        for i in range(6):
            made.append(i)
            yield i
    with data.Prefetcher(items(), depth=2) as ahead:
        time.sleep(0.3)  # the thread fills the queue, then waits
        assert len(made) <= 3  # 2 queued and 1 waiting for room
        assert next(ahead) == 0
        assert list(ahead) == [1, 2, 3, 4, 5]
        assert next(ahead, "end") == "end"  # ended, it stays ended
    assert not ahead.thread.is_alive()


def test_prefetcher_raises_the_error_where_its_item_is_read():
    def items():
        yield 1
        raise ValueError("example 7: no assistant turn")
    with data.Prefetcher(items()) as ahead:
        assert next(ahead) == 1  # the items made before the error come first
        with pytest.raises(ValueError, match="example 7"):
            next(ahead)
        assert next(ahead, "end") == "end"  # read again, it ends rather than waits
    assert not ahead.thread.is_alive()


def test_prefetcher_stops_its_thread_when_the_reader_leaves_early():
    def endless():
        i = 0
        while True:
            i += 1
            yield i
    with pytest.raises(KeyboardInterrupt):
        with data.Prefetcher(endless(), depth=1) as ahead:
            assert next(ahead) == 1
            raise KeyboardInterrupt  # as a second Ctrl-C in the loop does
    assert not ahead.thread.is_alive()
