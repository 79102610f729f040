"""Batched sampling for GRPO (model/generate.py, sample_completions): many prompts of different
lengths, G completions each, in one left-padded batch with the KV cache.

Proves: greedy rows give exactly what `generate` gives each prompt alone (its stop token kept),
with and without a LoRA adapter; left padding changes nothing, not even the log-probs, and each
row's positions start at 0 at its first real token; the returned log-probs are
log softmax(logits / T) of one plain forward of prompt + completion, untruncated by top_p, and the
tokens are inside top_p's nucleus; the generator decides the draws (greedy draws nothing), and
with a generator per prompt a group's draws do not depend on the rest of the batch; rows
stop on their own, max_new_tokens is honoured, decoding ends when every row has stopped; dropout
is off while sampling and the model's mode comes back. And the model change under it: with a
filled KV cache, document_ids cover the cached positions too, so a left-padded row decodes as it
would alone.

Tolerance rel 1e-5 (max |Δ| / max |ref|) on log-probs: the batched path computes the same sums as
the plain forward, in other orders (a masked SDPA call, other batch shapes), so the logits agree
to float32 rounding at this depth (`conftest.fp32_logits_bound`: 64 eps ~ 8e-6 of the logits'
scale, ~0.6 here); a log-softmax moves by at most twice that, against log-probs of ~5 (a 128-token
vocabulary): ~2e-6. Measured: 1e-7. Pads left visible, or each new token one position off,
measure 4e-2 to 9e-2.
"""

import pytest
import torch

import lora
from conftest import rel, save_tiny_hf
from model import KVCache, load_model
from model.generate import generate, sample_completions
from test_lora import randomize_lora

PROMPTS = [[5, 17, 99, 3], [42, 7, 7, 81, 20, 64, 2, 9, 33], [100, 11]]  # 4, 9 and 2 tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def with_adapter(model, dropout=0.0):
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=dropout, targets="all-linear"))
    randomize_lora(model, std=0.2)
    return model


def tokens_of(completions):
    return [c.token_ids for c in completions]


def plain_logps(model, prompt, completion, temperature):
    """log softmax(logits / T) of each completion token, by one forward of prompt + completion:
    no cache, no padding."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion.token_ids]))[0].float()
    at = logits[len(prompt) - 1:-1] / temperature  # (L, vocab): the positions that predict the completion
    return at.log_softmax(-1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]


@pytest.mark.parametrize("adapter", [False, True])
def test_greedy_rows_equal_generate_alone(tiny_dir, adapter):
    model = load_model(tiny_dir)
    model = with_adapter(model) if adapter else model
    free = [list(generate(model, p, 10)) for p in PROMPTS]
    stop = {free[0][3], free[2][6]}  # ends some rows early, not necessarily all
    out = sample_completions(model, PROMPTS, 2, 10, stop, temperature=0.0)
    assert [c.prompt_index for c in out] == [0, 0, 1, 1, 2, 2]
    for c in out:
        alone = list(generate(model, PROMPTS[c.prompt_index], 10, stop))
        if c.stopped:
            assert c.token_ids[:-1] == alone and c.token_ids[-1] in stop
        else:
            assert c.token_ids == alone and len(alone) == 10
    assert any(c.stopped for c in out)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_are_the_tempered_policy_of_a_plain_forward(tiny_dir, temperature):
    model = with_adapter(load_model(tiny_dir))
    g = torch.Generator().manual_seed(0)
    out = sample_completions(model, PROMPTS, 3, 12, {1}, temperature=temperature, top_p=0.9, generator=g)
    assert len(out) == 9
    for c in out:
        prompt = PROMPTS[c.prompt_index]
        ref = plain_logps(model, prompt, c, temperature)
        assert c.logps.dtype == torch.float32 and c.logps.shape == (len(c.token_ids),)
        assert rel(c.logps, ref) < 1e-5, rel(c.logps, ref)
        with torch.no_grad():  # each token inside top_p's nucleus; the nucleus renormalised is not logps
            logits = model(torch.tensor([prompt + c.token_ids]))[0, len(prompt) - 1:-1].float() / temperature
        p_sorted, order = logits.softmax(-1).sort(-1, descending=True)
        before = p_sorted.cumsum(-1) - p_sorted  # probability of the more likely tokens
        rank = (order == torch.tensor(c.token_ids)[:, None]).float().argmax(-1)
        assert (before.gather(-1, rank[:, None]) < 0.9).all()
        mass = (p_sorted * (before < 0.9)).sum(-1)
        assert rel(ref - mass.log(), ref) > 1e-3


def test_generator_decides_the_draws(tiny_dir):
    model = load_model(tiny_dir)
    run = lambda seed: tokens_of(sample_completions(model, PROMPTS, 2, 8, (), top_p=0.95,
                                                    generator=torch.Generator().manual_seed(seed)))
    assert run(0) == run(0)
    assert run(0) != run(1)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    sample_completions(model, PROMPTS, 2, 8, (), temperature=0.0, generator=g)
    assert torch.equal(g.get_state(), state)  # greedy draws nothing


def test_a_generator_per_prompt_makes_each_group_independent_of_the_batch(tiny_dir):
    """With a generator per prompt, a prompt's group draws the same completions whatever else the
    batch holds (other prompts, other padding): what lets GRPO's ranks each sample a share of a step."""
    model = load_model(tiny_dir)
    seeded = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]
    both = tokens_of(sample_completions(model, PROMPTS[:2], 3, 8, (), generator=seeded(1, 2)))
    assert both[:3] == tokens_of(sample_completions(model, PROMPTS[:1], 3, 8, (), generator=seeded(1)))
    assert both[3:] == tokens_of(sample_completions(model, PROMPTS[1:2], 3, 8, (), generator=seeded(2)))
    assert both[3:] != tokens_of(sample_completions(model, PROMPTS[1:2], 3, 8, (), generator=seeded(3)))
    with pytest.raises(ValueError, match="2 generators for 3 prompts"):
        sample_completions(model, PROMPTS, 3, 8, (), generator=seeded(1, 2))


def test_rows_stop_on_their_own_and_max_new_tokens_holds(tiny_dir):
    model = load_model(tiny_dir)
    free = tokens_of(sample_completions(model, PROMPTS, 1, 9, (), temperature=0.0))
    assert all(len(t) == 9 for t in free)
    stop = {free[1][2]}  # row 1 stops at its third token; the others where (if) they meet it
    out = sample_completions(model, PROMPTS, 1, 9, stop, temperature=0.0)
    for c, f in zip(out, free, strict=True):
        cut = next((i + 1 for i, t in enumerate(f) if t in stop), None)
        assert c.token_ids == f[:cut] and c.stopped == (cut is not None)
        assert c.logps.shape == (len(c.token_ids),)
    assert out[1].stopped and len(out[1].token_ids) <= 3
    assert len({len(c.token_ids) for c in out}) > 1
    short = sample_completions(model, PROMPTS, 1, 4, (), temperature=0.0)
    assert tokens_of(short) == [f[:4] for f in free] and not any(c.stopped for c in short)
    decodes = []  # model(...) calls: the decoding steps (the prefill runs hidden_states)
    model.register_forward_hook(lambda *_: decodes.append(1))
    every = {f[0] for f in free}  # every row stops at its first token: decoding ends there
    out = sample_completions(model, PROMPTS, 1, 9, every, temperature=0.0)
    assert all(c.token_ids == f[:1] and c.stopped for c, f in zip(out, free, strict=True))
    assert len(decodes) == 0
    sample_completions(model, PROMPTS, 1, 9, (), temperature=0.0)
    assert len(decodes) == 8  # 9 tokens: the last one is never fed


def test_dropout_off_while_sampling_and_mode_restored(tiny_dir):
    model = with_adapter(load_model(tiny_dir), dropout=0.5).train()
    first = tokens_of(sample_completions(model, PROMPTS, 2, 8, (), temperature=0.0))
    assert model.training and all(m.training for m in model.modules())
    assert tokens_of(sample_completions(model, PROMPTS, 2, 8, (), temperature=0.0)) == first
    model.eval()
    assert tokens_of(sample_completions(model, PROMPTS, 2, 8, (), temperature=0.0)) == first
    assert not model.training


def test_left_padding_changes_nothing(tiny_dir):
    """The values, and the positions themselves: RoPE sees only the difference of two positions,
    so a row shifted by its pads would compute the same up to rounding, which no tolerance tells
    apart; each row's positions must still start at 0 at its first real token, as alone."""
    model = with_adapter(load_model(tiny_dir))
    alone = sample_completions(model, [PROMPTS[2]], 1, 10, (), temperature=0.0)[0]
    positions = []  # position_ids (B, T) of each forward: the prefill, then one a token
    rope = model.rope
    model.rope = lambda position_ids, dtype: positions.append(position_ids) or rope(position_ids, dtype)
    batched = sample_completions(model, PROMPTS, 1, 10, (), temperature=0.0)[2]  # 7 pads before it
    assert positions[0][2, -2:].tolist() == [0, 1]  # its two prompt tokens
    assert [p[2].item() for p in positions[1:]] == list(range(2, 11))  # 9 tokens fed, the 10th not
    assert batched.token_ids == alone.token_ids
    assert rel(batched.logps, alone.logps) < 1e-5
    assert rel(alone.logps, plain_logps(model, PROMPTS[2], alone, 1.0)) < 1e-5


def test_document_ids_with_a_filled_cache(tiny_dir):
    """Llama.attention_mask reads document_ids (B, start + T) when the cache holds `start`
    positions: a left-padded row, prefilled then decoded, gives the logits of that row alone."""
    model = load_model(tiny_dir)
    short, long_ = [3, 50, 7], [9, 8, 7, 6, 5, 4]
    ids = torch.tensor([[0, 0, 0] + short, long_])
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    pos = torch.tensor([[0, 0, 0, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    nxt = torch.tensor([[11, 12], [13, 14]])
    with torch.no_grad():
        cache = KVCache(model.config, 2, 8, torch.float32, "cpu")
        model(ids, pos, docs[:, :6], cache)
        with pytest.raises(ValueError, match="document_ids cover 6 positions, the keys 7"):
            model(nxt[:, :1], pos[:, -1:] + 1, docs[:, :6], cache)  # the cached positions left out
        step1 = model(nxt[:, :1], pos[:, -1:] + 1, docs[:, :7], cache)
        step2 = model(nxt[:, 1:], pos[:, -1:] + 2, docs[:, :8], cache)
        for b, row in enumerate((short, long_)):
            ref = model(torch.tensor([row + nxt[b].tolist()]))[0, -2:]
            assert rel(torch.cat([step1[b], step2[b]]), ref) < 1e-5
