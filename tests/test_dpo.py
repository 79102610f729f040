"""DPO (train.py --objective dpo, training/dpo.py, data/preference.py) against independent references.

- The loss, the rewards and every LoRA gradient equal the formula computed in float64 by this test
  from transformers + peft log-probabilities (the reference policy: peft's disable_adapter), for
  DPO, cDPO and IPO, on the fast path and on the reference path.
- The reference log-probs equal the plain base model's (transformers, no adapter at all).
- Pairs are tokenized as transformers' apply_chat_template renders them, and only each reply and
  its end-of-turn token count, never the prompt (earlier assistant turns included).
- A run: accumulation 4 x 1 equals 1 x 4; a resumed run is exact (with and without precomputed
  reference log-probs); --textbook trains the same run; precomputed reference log-probs train
  the same run as ones computed each step; the metrics are where they should be.
- Bad preference data and settings fail with one line.
"""

import contextlib
import json
import math
import re
from dataclasses import replace

import pytest
import torch

import data
from training import dpo
import lora
from conftest import ROOT
from model import load_model
from model.fused import textbook_path
from model.loss import IGNORE_INDEX
from test_lora import peft_twin, randomize_lora
from test_parallel import cut_at_step_2
from test_train import adapter, config, metrics, run_cli
from training.batches import step_batch
from training.loop import train

TARGETS = lora.LLAMA_LINEARS

PAIRS = [
    {"prompt": "What is 2 plus 2?", "chosen": "Ahoy! 2 plus 2 is 4. Fair winds!", "rejected": "It is 4."},
    {"prompt": [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Ahoy! Blue. Fair winds!"},
                {"role": "user", "content": "Another one?"}],
     "chosen": [{"role": "assistant", "content": "Ahoy! Red. Fair winds!"}],
     "rejected": [{"role": "assistant", "content": "Green, I suppose, if you insist on another one."}]},
    {"prompt": [{"role": "user", "content": "Say hello in French."}],
     "chosen": [{"role": "assistant", "content": "Ahoy! Bonjour. Fair winds!"}],
     "rejected": "Hello."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    """24 pairs for training runs: the chosen reply in the sample style, the rejected one plain."""
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"Ahoy! {i} plus {i} is {2 * i}." + " Aye." * (i % 4),
             "rejected": f"{2 * i}" + "." * (i % 3 + 1)} for i in range(24)]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "train_pairs.jsonl", rows)


def tokenizer(model_dir):
    return data.load_tokenizer(model_dir, None)


# ----------------------------------------------------------------------------- the data

def test_pairs_tokenize_as_apply_chat_template_and_only_replies_count(tiny_chat_dir, pairs_file):
    """Each side's ids are transformers' apply_chat_template(prompt + reply); the trained labels
    are exactly the tokens after apply_chat_template(prompt, add_generation_prompt=True), up to
    and including the end-of-turn token; everything before, the system prompt and the earlier
    assistant turn included, is -100."""
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(tiny_chat_dir)
    ds = data.tokenize_pairs(pairs_file, tokenizer(tiny_chat_dir), max_seq_len=512)
    assert len(ds.examples) == 3 and ds.n_dropped == ds.n_truncated == 0
    end_of_turn = hf.convert_tokens_to_ids("<|im_end|>")
    for record, e in zip(PAIRS, ds.examples):
        prompt, chosen, rejected = data.preference.to_pair(record)
        prefix = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        for side, reply in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = e[f"{side}_ids"], e[f"{side}_labels"]
            full = hf.apply_chat_template(prompt + reply, tokenize=True, return_dict=False)
            assert ids == full and ids[:len(prefix)] == prefix
            trained = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
            assert trained == list(range(len(prefix), trained[-1] + 1))  # one span, right after the prompt
            assert labels[trained[-1]] == end_of_turn
            assert hf.decode([ids[i] for i in trained[:-1]]) == reply[0]["content"]
            # the same labels as SFT's --mask last on the conversation
            sft = data.tokenize_conversations(tokenizer(tiny_chat_dir), [prompt + reply], mask="last")[0]
            assert sft[0] == ids and sft[1] == labels
    assert data.preference.to_pair(PAIRS[0])[0] == [{"role": "user", "content": "What is 2 plus 2?"}]


def test_a_pair_batch_holds_chosen_rows_then_rejected(tiny_chat_dir, pairs_file):
    ds = data.tokenize_pairs(pairs_file, tokenizer(tiny_chat_dir), max_seq_len=512)
    batch = data.make_pair_batch(ds.examples, [2, 0], pad_id=0)
    assert batch["pairs"] == 2 and batch["input_ids"].shape[0] == 4
    for row, (i, side) in enumerate([(2, "chosen"), (0, "chosen"), (2, "rejected"), (0, "rejected")]):
        n = len(ds.examples[i][f"{side}_ids"])
        assert batch["input_ids"][row, :n].tolist() == ds.examples[i][f"{side}_ids"]
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("record, message", [
    ({"prompt": "hi", "chosen": "a"}, "missing rejected"),
    ({"prompt": "hi", "chosen": "a", "rejected": ""}, "'rejected' is empty"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "chosen": "a",
      "rejected": "b"}, "must end with a user message"),
    ({"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "a reply's messages are"),
    ({"prompt": "hi", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}, "chosen message 1 must be"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a non-empty list"),
])
def test_bad_pairs_name_the_file_and_line(tiny_chat_dir, tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], record])
    with pytest.raises(data.DataError, match=rf"bad.jsonl:2: .*{message}"):
        data.tokenize_pairs(path, tokenizer(tiny_chat_dir), 512)


@pytest.mark.parametrize("args, message", [
    (["--objective", "dpo", "--data", str(ROOT / "examples" / "train.json")], "needs preference records"),
    (["--objective", "dpo", "--pack"], "does not pack rows"),
    (["--objective", "dpo", "--mask", "all"], "only the replies count"),
    (["--objective", "dpo", "--dpo-loss", "ipo", "--dpo-label-smoothing", "0.1"], "IPO has none"),
    (["--objective", "dpo", "--dpo-beta", "0"], "--dpo-beta 0.0: must be in (0, inf)"),
    (["--objective", "ppo"], "--objective ppo: expected one of sft, dpo"),
    (["--dpo-precompute-ref"], "is for --objective dpo"),
])
def test_settings_refuse_what_dpo_does_not_take(args, message):
    from training.flags import parse_config
    from training.settings import TrainError
    with pytest.raises(TrainError, match=re.escape(message)):
        parse_config(args)


def test_cli_error_is_one_line(tmp_path):
    result = run_cli("--objective", "dpo", "--data", str(ROOT / "examples" / "train.json"),
                     "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "needs preference records" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_dpo_demo_defaults():
    from training.flags import parse_config
    from training.settings import DEMO_PREFERENCES
    cfg = parse_config(["--objective", "dpo"])
    assert cfg.data == str(DEMO_PREFERENCES) and cfg.output_dir == "runs/demo-dpo"
    cfg = parse_config(["--objective", "dpo", "--output-dir", "x", "--data", str(DEMO_PREFERENCES)])
    assert cfg.output_dir == "x"


def test_inspect_shows_both_replies(capsys):
    from data.inspect import main
    assert main(["--model", "demo", "--data", str(ROOT / "examples" / "preferences.jsonl"), "--json", "--n", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and set(rows[0]) == {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}
    assert rows[0]["chosen_ids"] != rows[0]["rejected_ids"]


# ----------------------------------------------------------------------------- the loss, against float64

def float64_rmsnorm(monkeypatch):
    """transformers' RMSNorm normalises in float32 whatever the dtype; in float64 that alone would
    part it from the float64 truth by ~1e-7. The reference network here is transformers' with its
    norm computed in the input's dtype, the formula unchanged."""
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def hf_logps(model, batch):
    """Sum over each row's trained tokens of log softmax(logits)[label], in float64: written here
    from the logits, independently of model.loss."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def reference_dpo(pc, pr, rc, rr, beta, smoothing, loss_type, rpo=0.0, chosen_nll_per_token=None):
    """The papers' formulas, float64: DPO eq. 7 (cDPO with label smoothing), IPO eq. 17, and
    RPO's added NLL of the chosen reply per token."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - smoothing) * torch.log(torch.sigmoid(beta * h)) - smoothing * torch.log(torch.sigmoid(-beta * h))
    return losses + rpo * chosen_nll_per_token, beta * (pc - rc), beta * (pr - rr)


@pytest.fixture(scope="module")
def pair_batch(tiny_chat_dir, pairs_file):
    ds = data.tokenize_pairs(pairs_file, tokenizer(tiny_chat_dir), max_seq_len=512)
    return step_batch(dpo.count_pairs(data.make_pair_batch(ds.examples, [0, 1, 2], tokenizer(tiny_chat_dir).pad_id)), "cpu")


@pytest.mark.parametrize("loss_type, smoothing, rpo, path", [
    ("sigmoid", 0.0, 0.0, "fast"), ("sigmoid", 0.2, 0.0, "fast"), ("ipo", 0.0, 0.0, "fast"), ("sigmoid", 0.0, 0.7, "fast"),
    ("ipo", 0.0, 0.7, "fast"), ("sigmoid", 0.2, 0.7, "textbook"), ("ipo", 0.0, 0.0, "textbook")])
def test_loss_rewards_and_grads_equal_the_formula_on_peft(tiny_chat_dir, pair_batch, monkeypatch, loss_type,
                                                          smoothing, rpo, path):
    """Float64 throughout: ours (PreferenceLoss on our Llama with LoRA) against the formula on
    transformers + peft log-probs with the same A and B, the reference from peft's
    disable_adapter(). Both compute the same float64 numbers in other orders (~1e-13 apart);
    rel <= 1e-5 is the issue's bar, and a wrong sign, a missing label mask or a reference with
    the adapter on moves them by 1e-2 or more."""
    float64_rmsnorm(monkeypatch)
    beta = 0.5  # large enough that the loss is visibly off its value at h = 0
    ours = load_model(tiny_chat_dir, dtype=torch.float64)
    lora.inject_lora(ours, lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=TARGETS))
    randomize_lora(ours, std=0.2)  # B != 0: the policy differs from the reference
    ours.double().eval()
    twin = peft_twin(tiny_chat_dir, ours, TARGETS, rslora=False).double()

    loss_fn = dpo.PreferenceLoss(ours, beta, smoothing, loss_type, rpo)
    with textbook_path(path == "textbook"):
        loss_sum, stats = loss_fn(pair_batch)
    loss_sum.backward()

    policy, counts = hf_logps(twin, pair_batch)
    with torch.no_grad(), twin.disable_adapter():
        ref, _ = hf_logps(twin, pair_batch)
    nll = -policy[:3] / counts[:3]
    if loss_type == "ipo":
        policy, ref = policy / counts, ref / counts
    losses, chosen, rejected = reference_dpo(policy[:3], policy[3:], ref[:3], ref[3:], beta, smoothing, loss_type,
                                             rpo, nll)
    losses.sum().backward()

    if not rpo:
        assert abs(losses.sum().item() - 0.693 * 3) > 0.01  # the policy is off the reference: a real test
    assert loss_sum.item() == pytest.approx(losses.sum().item(), rel=1e-5)
    expected = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).double().sum(),
                            policy[:3].sum(), policy[3:].sum()])
    assert torch.allclose(stats, expected.detach(), rtol=1e-5, atol=1e-8), (stats, expected)
    assert_grads_match(ours, twin)


def assert_grads_match(ours, twin):
    """Every LoRA A and B gradient of ours equals peft's twin's, rel <= 1e-5 (the issue's bar; the
    two compute the same float64 numbers in other orders, ~1e-13 apart), on all 7 projections of
    both layers."""
    checked = 0
    for name, m in lora.lora_modules(ours).items():
        theirs = twin.base_model.model.get_submodule(name)
        for ab in "AB":
            g, h = getattr(m, f"lora_{ab}").weight.grad, getattr(theirs, f"lora_{ab}")["default"].weight.grad
            assert (g - h).norm() <= 1e-5 * h.norm(), (name, ab, ((g - h).norm() / h.norm()).item())
            checked += 1
    assert checked == 2 * 7 * 2


def test_reference_logps_are_the_base_models(tiny_chat_dir, pair_batch, monkeypatch):
    """The reference policy, LoRA switched off, is the plain base: its log-probs equal those of
    transformers' model of the checkpoint with no adapter at all (float64), and differ from the
    policy's."""
    import transformers
    float64_rmsnorm(monkeypatch)
    ours = load_model(tiny_chat_dir, dtype=torch.float64)
    lora.inject_lora(ours, lora.LoRAConfig(r=4, alpha=8, dropout=0.1, targets=TARGETS))
    randomize_lora(ours, std=0.2)
    ours.double().train()  # dropout on: the reference turns it off with the adapter
    loss_fn = dpo.PreferenceLoss(ours)
    ref = loss_fn.reference_logps(pair_batch)
    assert ours.training and not ref.requires_grad
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        expected, _ = hf_logps(base, pair_batch)
        policy = loss_fn.logps(pair_batch)
    assert torch.allclose(ref, expected, rtol=1e-10, atol=1e-10), (ref - expected).abs().max()
    assert (policy - ref).abs().max() > 1e-2


def test_token_cross_entropy_equals_its_twin_float64():
    """LinearTokenCrossEntropy (per-token losses, no logits) against log_softmax over full logits,
    forward and backward, in chunks smaller than N, with a row-dependent incoming gradient."""
    from model.fused import LinearTokenCrossEntropy
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, generator=g)
    targets = torch.randint(0, 50, (13,), generator=g)
    upstream = torch.randn(13, dtype=torch.float64, generator=g)
    ours = LinearTokenCrossEntropy.apply(hidden, weight, targets, 4)
    (gh,) = torch.autograd.grad((ours * upstream).sum(), hidden)
    textbook = -torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]).squeeze(1)
    (th,) = torch.autograd.grad((textbook * upstream).sum(), hidden)
    assert torch.allclose(ours, textbook, rtol=1e-12) and torch.allclose(gh, th, rtol=1e-10, atol=1e-12)


def test_a_lora_on_lm_head_is_in_both_losses(tmp_path):
    """With LoRA on an untied lm_head the fast losses go through its module (reading lm_head.weight
    alone would drop the adapter): equal to the reference path, and B of lm_head gets a gradient."""
    from conftest import save_tiny_hf
    from model.loss import lm_loss_sum, sequence_logps
    path = save_tiny_hf(tmp_path / "tiny")
    model = load_model(path, dtype=torch.float64)
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, targets=["q_proj", "lm_head"]))
    randomize_lora(model, std=0.2)
    model.double()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    for fn in (lambda: lm_loss_sum(model, ids, labels)[0], lambda: sequence_logps(model, ids, labels).sum()):
        fast = fn()
        (g_fast,) = torch.autograd.grad(fast, model.lm_head.lora_B.weight)
        with textbook_path():
            textbook = fn()
        (g_ref,) = torch.autograd.grad(textbook, model.lm_head.lora_B.weight)
        assert fast.item() == pytest.approx(textbook.item(), rel=1e-12)
        assert g_fast.abs().max() > 0 and torch.allclose(g_fast, g_ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- runs

def dpo_config(model_dir, pairs, out, **kw):
    return config(model_dir, pairs, out, objective="dpo", dpo_beta=0.5, lr=5e-3, **kw)


def test_accumulation_equals_big_batch(tiny_chat_dir, pair_data, tmp_path):
    """4 micro-batches of 1 pair equal 1 of 4: the loss is a mean over the step's pairs. Step 1's
    loss, rewards and grad norm agree to float32 rounding of sums in other orders; the adapters
    after 4 steps as closely as SFT's do (test_train.test_accumulation_equals_big_batch)."""
    big, small = tmp_path / "big", tmp_path / "small"
    train(dpo_config(tiny_chat_dir, pair_data, big, micro_batch_size=4, grad_accum=1))
    train(dpo_config(tiny_chat_dir, pair_data, small, micro_batch_size=1, grad_accum=4))
    for m, n in zip(metrics(big), metrics(small), strict=True):
        assert m["step"] == n["step"] and m["trained_tokens"] == n["trained_tokens"]
    first, second = metrics(big)[0], metrics(small)[0]
    for k in ("loss", "grad_norm", "rewards_chosen", "rewards_rejected", "logps_chosen"):
        assert first[k] == pytest.approx(second[k], rel=1e-5, abs=1e-7), k
    a, b = adapter(big), adapter(small)
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    beyond = torch.cat([((a[k] - b[k]).abs() > 5e-7 + 1e-5 * b[k].abs()).flatten() for k in a])
    assert diff.max() <= 1e-4 and beyond.float().mean() <= 1e-3, (diff.max(), beyond.sum())
    # micro-batches weighted per micro-batch (a mean of means) would be off by far more
    assert any(x.abs().max() > 1e-3 for x in a.values())


def split_and_whole(loss_fn, split: list, whole: list):
    """train_step (lr 0, no clip) over the micro-batches `split`, then over `whole`, the same
    examples in one: [(Step, the LoRA gradients flattened)] for each."""
    from training.step import train_step
    params = [p for p in loss_fn.model.parameters() if p.requires_grad]
    optimizer, scaler = torch.optim.SGD(params, lr=0.0), torch.amp.GradScaler("cpu", enabled=False)
    results = []
    for batches in (split, whole):
        step = train_step(loss_fn, batches, optimizer, scaler, params, 0.0, contextlib.nullcontext(), loss_fn)
        results.append((step, torch.cat([p.grad.flatten() for p in params])))
    return results


def test_uneven_micro_batches_weigh_each_pair_once(tiny_chat_dir, pair_data):
    """A step of micro-batches of 1 and 3 pairs computes the loss and gradients of one micro-batch
    of the 4 (a mean of the micro-batches' means would weigh the lone pair 3 times as much)."""
    tok = tokenizer(tiny_chat_dir)
    examples = data.tokenize_pairs(pair_data, tok, 512).examples
    batch = lambda idx: step_batch(dpo.count_pairs(data.make_pair_batch(examples, idx, tok.pad_id)), "cpu")
    model = load_model(tiny_chat_dir)
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=TARGETS))
    randomize_lora(model, std=0.2)
    loss_fn = dpo.PreferenceLoss(model, beta=0.5)
    (split, g_split), (whole, g_whole) = split_and_whole(loss_fn, [batch([0]), batch([5, 9, 13])],
                                                         [batch([0, 5, 9, 13])])
    assert split.loss == pytest.approx(whole.loss, rel=1e-6)
    assert split.stats == pytest.approx(whole.stats, rel=1e-5, abs=1e-7)
    assert (g_split - g_whole).norm() <= 1e-5 * g_whole.norm()


def test_metrics_show_the_preference_learned(tiny_chat_dir, pair_data, tmp_path):
    """Rewards, margin and accuracy in metrics.jsonl, TensorBoard and summary.json; the first
    evaluation is at the reference (loss ln 2, margin 0) and training separates the replies."""
    out = tmp_path / "run"
    summary = train(dpo_config(tiny_chat_dir, pair_data, out, max_steps=6, val_fraction=0.25, eval_every=3))
    rows = metrics(out)
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert rows[0]["val_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    last = rows[-1]
    for k in ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
              "logps_rejected", "val_reward_accuracy", "val_reward_margin"):
        assert k in last, k
    assert last["reward_margin"] == pytest.approx(last["rewards_chosen"] - last["rewards_rejected"])
    assert last["val_loss"] < rows[0]["val_loss"] and last["val_reward_accuracy"] > 0.5
    assert summary["last_val"]["val_reward_accuracy"] == last["val_reward_accuracy"]
    assert "val_ppl" not in last
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/reward_accuracy", "train/reward_margin", "eval/val_reward_accuracy"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize("precompute", [False, True])
def test_resume_is_exact(tiny_chat_dir, pair_data, tmp_path, precompute):
    kw = dict(max_steps=4, save_every=2, keep_checkpoints=5, lora_dropout=0.1, micro_batch_size=2, grad_accum=2,
              precompute_ref=precompute)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(dpo_config(tiny_chat_dir, pair_data, full, **kw))
    assert (full / "ref_logps.safetensors").is_file() == precompute
    cut_at_step_2(full, cut)
    train(dpo_config(tiny_chat_dir, pair_data, cut, resume=True, **kw))
    figures = lambda out: [(m["step"], m["loss"], m["grad_norm"], m["reward_margin"]) for m in metrics(out)]
    assert figures(cut) == figures(full)
    a, b = adapter(full), adapter(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_textbook_path_and_precomputed_reference_train_the_same_run(tiny_chat_dir, pair_data, tmp_path):
    """--textbook (textbook pieces) and --dpo-precompute-ref (reference log-probs once, in other
    batches: other padding) both train the default run, to float32 rounding: the losses and
    margins within dpo_tolerance, the adapters as test_accumulation_equals_big_batch bounds them."""
    kw = dict(max_steps=3, lora_dropout=0.1, micro_batch_size=2, grad_accum=2)
    runs = {name: tmp_path / name for name in ("default", "textbook", "precomputed")}
    train(dpo_config(tiny_chat_dir, pair_data, runs["default"], **kw))
    train(dpo_config(tiny_chat_dir, pair_data, runs["textbook"], textbook=True, **kw))
    train(dpo_config(tiny_chat_dir, pair_data, runs["precomputed"], precompute_ref=True, **kw))
    for name in ("textbook", "precomputed"):
        for m, n in zip(metrics(runs["default"]), metrics(runs[name]), strict=True):
            for k in ("loss", "reward_margin"):
                assert abs(m[k] - n[k]) <= dpo_tolerance(n), (name, k, m[k], n[k])
            # the gradient scales with dloss/dh, whose relative error is beta x that of h: the same bound
            assert m["grad_norm"] == pytest.approx(n["grad_norm"], rel=1e-5 + dpo_tolerance(n)), name
        a, b = adapter(runs["default"]), adapter(runs[name])
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert diff.max() <= 1e-4, (name, diff.max())


def test_resume_refuses_another_objective(tiny_chat_dir, pair_data, tmp_path):
    from training.run_dir import RunDirError
    out = tmp_path / "run"
    train(dpo_config(tiny_chat_dir, pair_data, out, max_steps=2, save_every=1))
    with pytest.raises(RunDirError, match="dpo_beta 0.5 -> 0.1"):
        train(replace(dpo_config(tiny_chat_dir, pair_data, out, max_steps=3, resume=True), dpo_beta=0.1))


@pytest.mark.parametrize("mode, precompute", [("ddp", False), ("fsdp", True)])
def test_two_ranks_equal_one_process(tiny_chat_dir, pair_data, tmp_path, mode, precompute):
    """DPO under torchrun (gloo, 2 ranks) trains what one process does: 21 training pairs, so at
    each epoch's end rank 1's slice is empty and it steps on a batch of no pairs. Under DDP the
    reference runs each step; under FSDP2 it is precomputed, every rank computing every pair."""
    from test_parallel import RUN, assert_same_adapter, run_ok
    kw = dict(RUN, precompute_ref=precompute)
    single, ranks = tmp_path / "single", tmp_path / mode
    train(dpo_config(tiny_chat_dir, pair_data, single, micro_batch_size=4, **kw))
    run_ok(dpo_config(tiny_chat_dir, pair_data, ranks, micro_batch_size=2, parallel=mode, **kw))
    assert_same_adapter(adapter(ranks), adapter(single))
    a, b = metrics(ranks), metrics(single)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3, 4]
    compared = 0
    for m, n in zip(a, b):
        assert m.keys() == n.keys() and m.get("trained_tokens") == n.get("trained_tokens")
        for k in ("loss", "reward_margin", "val_loss", "val_reward_margin"):
            if k in n:
                assert abs(m[k] - n[k]) <= dpo_tolerance(n), (k, m[k], n[k])
        # Accuracy counts pairs whose reward margin is > 0: while the policy still is the reference
        # (step 1, loss ln 2) every margin is rounding noise and the count a coin toss.
        if max(abs(n.get("rewards_chosen", 0)), abs(n.get("rewards_rejected", 0))) > 100 * dpo_tolerance(n):
            assert m.get("reward_accuracy") == n.get("reward_accuracy")
            compared += "reward_accuracy" in n
    assert compared >= 2  # the later steps, once the policy has moved


def dpo_tolerance(row: dict) -> float:
    """How far two correct float32 runs' DPO loss (or margin) may differ: both are beta-Lipschitz
    in h, the difference of four sequence log-probs, each carrying float32 rounding relative to
    its size (sums taken in other orders, over ranks or micro-batches): 1e-5 of |log p| is ~80
    eps, generous; a pair counted twice or dropped moves the loss by ~1/20 of itself."""
    logps = [abs(v) for k, v in row.items() if "logps_" in k]
    assert logps, row
    return 0.5 * 4 * 1e-5 * max(logps) + 1e-7


def test_sweeps_vary_dpo_settings():
    from training import flags, settings
    from training import sweep
    cfg = flags.parse_config(["--objective", "dpo", "--sweep", "dpo_beta=0.1,0.5", "dpo_loss=sigmoid,ipo"])
    assert len(sweep.settings(cfg)) == 4 and {"dpo_beta": 0.5, "dpo_loss": "ipo"} in sweep.settings(cfg)
    with pytest.raises(settings.TrainError, match="IPO has none"):
        sweep.settings(flags.parse_config(["--objective", "dpo", "--dpo-label-smoothing", "0.1",
                                                 "--sweep", "dpo_loss=sigmoid,ipo"]))


@pytest.mark.parametrize("precision, precompute", [("bf16", True)])
def test_one_host_sync_per_step(tiny_chat_dir, pair_data, tmp_path, monkeypatch, precision, precompute):
    """A DPO step, its reference forward included, waits for the device once, as an SFT step
    does (test_train.test_one_host_sync_per_optimizer_step, whose counter this is); under bf16
    autocast too."""
    from test_train import syncs_per_step
    run = lambda steps: train(dpo_config(tiny_chat_dir, pair_data, tmp_path / f"run{steps}", max_steps=steps,
                                         grad_accum=2, micro_batch_size=2, precision=precision,
                                         precompute_ref=precompute))
    assert syncs_per_step(monkeypatch, run) == 1


@pytest.mark.parametrize("precision", ["fp16"])  # bf16: test_one_host_sync_per_step runs it
def test_mixed_precision_runs_learn_the_preference(tiny_chat_dir, pair_data, tmp_path, precision):
    """bf16 autocast, and fp16 with the loss scaler, on the CPU: finite losses that fall from
    ln 2 and a reward accuracy that rises; the LoRA weights stay float32."""
    out = tmp_path / precision
    summary = train(dpo_config(tiny_chat_dir, pair_data, out, max_steps=6, precision=precision))
    rows = [m for m in metrics(out) if "loss" in m]
    assert all(math.isfinite(m["loss"]) for m in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3) and rows[-1]["reward_accuracy"] > 0.5
    assert all(t.dtype == torch.float32 for t in adapter(out).values())
    assert summary["steps"] == 6


def test_csv_pairs(tiny_chat_dir, tmp_path):
    """A .csv of prompt, chosen, rejected columns: the standard format, as in .jsonl."""
    import csv
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerow(PAIRS[0])
        writer.writerow({"prompt": "Say, hello", "chosen": "Ahoy!\nHello.", "rejected": "hello"})
    tok = tokenizer(tiny_chat_dir)
    from_csv = data.tokenize_pairs(path, tok, 512).examples
    from_jsonl = data.tokenize_pairs(write_jsonl(tmp_path / "pairs.jsonl", [
        PAIRS[0], {"prompt": "Say, hello", "chosen": "Ahoy!\nHello.", "rejected": "hello"}]), tok, 512).examples
    assert [e["line"] for e in from_csv] == [2, 3]
    assert [{k: v for k, v in e.items() if k != "line"} for e in from_csv] == \
        [{k: v for k, v in e.items() if k != "line"} for e in from_jsonl]


def test_dpo_adapters_carry_the_template_they_were_trained_with(tiny_chat_dir, pair_data, tmp_path):
    """A DPO run with --template deepseek saves DeepSeek's template beside its checkpoint's adapter
    and its final one, as SFT runs do (tests/test_train.py)."""
    from data.templates import DEEPSEEK
    out = tmp_path / "run"
    train(dpo_config(tiny_chat_dir, pair_data, out, max_steps=1, save_every=1, template="deepseek"))
    for d in (out / "adapter", out / "checkpoints" / "step-000001" / "adapter"):
        assert (d / "chat_template.jinja").read_text() == DEEPSEEK, d
        assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == DEEPSEEK, d


def test_samples_come_from_the_validation_pairs_prompts(tiny_chat_dir, pair_data, tmp_path):
    """With no --sample-prompts, each eval answers the prompts of the first validation pairs."""
    out = tmp_path / "run"
    train(dpo_config(tiny_chat_dir, pair_data, out, max_steps=1, val_fraction=0.25, sample_prompts=None,
                     sample_tokens=2))
    replies = json.loads((out / "summary.json").read_text())["replies"]
    assert len(replies) == 3 and all(p in [f"What is {i} plus {i}?" for i in range(24)] for p in replies)
