"""ORPO, SimPO (training/reference_free.py) and KTO (training/kto.py, data/unpaired.py) against
independent references, as tests/test_dpo.py checks DPO:

- The loss, the metrics and every LoRA gradient equal the papers' formulas computed here in
  float64 from transformers + peft log-probabilities (KTO's reference policy: peft's
  disable_adapter), on the fast path and the textbook path.
- The loss functions equal TRL's own (tests/trl_reference.py) on the same log-probs.
- A run: accumulation 4 x 1 equals 1 x 4; a resumed run is exact; the metrics are written.
- Settings that do not apply to an objective are refused with one line.
"""

import contextlib
import json
import re

import pytest
import torch

import data
import lora
from conftest import ROOT
from model import load_model
from model.fused import textbook_path
from test_dpo import assert_grads_match, float64_rmsnorm, hf_logps, pair_batch, pair_data, pairs_file  # noqa: F401
from test_dpo import tokenizer, write_jsonl
from test_lora import peft_twin, randomize_lora
from test_parallel import cut_at_step_2
from test_train import adapter, config, metrics
from training import kto, reference_free
from training.batches import step_batch
from training.loop import train

TARGETS = lora.LLAMA_LINEARS

RECORDS = [
    {"prompt": "What is 2 plus 2?", "completion": "Ahoy! 2 plus 2 is 4. Fair winds!", "label": True},
    {"prompt": "Name a colour.", "completion": "Green, I suppose, if you insist.", "label": False},
    {"prompt": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}],
     "completion": [{"role": "assistant", "content": "Ahoy! Hello. Fair winds!"}], "label": True},
    {"prompt": "Say hello in French.", "completion": "Hello.", "label": False},
]


@pytest.fixture(scope="module")
def kto_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("kto") / "kto.jsonl", RECORDS)


@pytest.fixture(scope="module")
def kto_data(tmp_path_factory):
    """24 records for training runs: the sample style desirable, plain replies undesirable."""
    rows = [{"prompt": f"What is {i} plus {i}?",
             "completion": (f"Ahoy! {i} plus {i} is {2 * i}." + " Aye." * (i % 4)) if i % 2 else f"{2 * i}.",
             "label": bool(i % 2)} for i in range(24)]
    return write_jsonl(tmp_path_factory.mktemp("kto") / "train_kto.jsonl", rows)


@pytest.fixture(scope="module")
def kto_batch(tiny_chat_dir, kto_file):
    ds = data.tokenize_unpaired(kto_file, tokenizer(tiny_chat_dir), max_seq_len=512)
    return step_batch(kto.count_unpaired(data.make_unpaired_batch(ds.examples, [0, 1, 2, 3],
                                                                  tokenizer(tiny_chat_dir).pad_id)), "cpu")


def float64_pair(tiny_chat_dir, monkeypatch, seed: int = 0):
    """Our Llama with random LoRA (B != 0) and peft's twin with the same A and B, in float64."""
    float64_rmsnorm(monkeypatch)
    torch.manual_seed(seed)
    ours = load_model(tiny_chat_dir, dtype=torch.float64)
    lora.inject_lora(ours, lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=TARGETS))
    randomize_lora(ours, std=0.2)
    ours.double().eval()
    return ours, peft_twin(tiny_chat_dir, ours, TARGETS, rslora=False).double()


# ----------------------------------------------------------------------------- the papers' formulas

def paper_orpo(avg_w, avg_l, lam):
    """Hong et al. 2024, eq. 6-7, float64: P = exp(mean log-prob), odds = P / (1 - P)."""
    odds = lambda a: torch.exp(a) / (1 - torch.exp(a))
    l_or = -torch.log(torch.sigmoid(torch.log(odds(avg_w) / odds(avg_l))))
    return -avg_w + lam * l_or, torch.log(torch.sigmoid(torch.log(odds(avg_w) / odds(avg_l)))), \
        torch.log(odds(avg_w) / odds(avg_l))


def paper_simpo(avg_w, avg_l, beta, gamma):
    """Meng et al. 2024, eq. 6, float64."""
    return -torch.log(torch.sigmoid(beta * avg_w - beta * avg_l - gamma))


def paper_kto(policy, ref, policy_kl, ref_kl, desirable, beta, w_d, w_u):
    """Ethayarajh et al. 2024 (eq. 8, lambda_y - v(x, y)), z0 as TRL estimates it from mismatched
    pairs: max(0, mean(log pi - log ref)), a constant to the gradient."""
    z0 = (policy_kl - ref_kl).mean().clamp(min=0).detach()
    r = policy - ref
    v = torch.where(desirable, w_d * torch.sigmoid(beta * (r - z0)), w_u * torch.sigmoid(beta * (z0 - r)))
    lam = torch.where(desirable, torch.full_like(r, w_d), torch.full_like(r, w_u))
    return lam - v, z0


@pytest.mark.parametrize("objective, path", [("orpo", "fast"), ("orpo", "textbook"), ("simpo", "fast"),
                                             ("simpo", "textbook")])
def test_orpo_and_simpo_equal_the_formula_on_peft(tiny_chat_dir, pair_batch, monkeypatch, objective, path):  # noqa: F811
    """Loss, every metric and every LoRA gradient of ours (float64) against the paper's formula on
    transformers + peft log-probs, averaged over each reply's trained tokens (its reply and end of
    turn), rel <= 1e-5: a sum where a mean belongs, or the prompt counted, moves them by far more."""
    ours, twin = float64_pair(tiny_chat_dir, monkeypatch)
    lam, beta, gamma = 0.7, 2.5, 1.2
    loss_fn = reference_free.ORPOLoss(ours, lam) if objective == "orpo" else reference_free.SimPOLoss(ours, beta, gamma)
    with textbook_path(path == "textbook"):
        loss_sum, stats = loss_fn(pair_batch)
    loss_sum.backward()

    policy, counts = hf_logps(twin, pair_batch)
    avg = policy / counts
    avg_w, avg_l = avg[:3], avg[3:]
    if objective == "orpo":
        losses, log_sigmoid, ratio = paper_orpo(avg_w, avg_l, lam)
        rewards = lam * avg_w, lam * avg_l
        extra = [log_sigmoid.sum(), ratio.sum(), -avg_w.sum()]
    else:
        losses, rewards, extra = paper_simpo(avg_w, avg_l, beta, gamma), (beta * avg_w, beta * avg_l), []
    losses.sum().backward()
    assert loss_sum.item() == pytest.approx(losses.sum().item(), rel=1e-5)
    expected = torch.stack([rewards[0].sum(), rewards[1].sum(), (rewards[0] > rewards[1]).double().sum(),
                            avg_w.sum(), avg_l.sum(), *extra]).detach()
    assert torch.allclose(stats, expected, rtol=1e-5, atol=1e-8), (stats, expected)
    assert_grads_match(ours, twin)
    means = loss_fn.metrics(stats.tolist(), 3)
    assert means["reward_margin"] == pytest.approx((rewards[0] - rewards[1]).mean().item(), rel=1e-5)


@pytest.mark.parametrize("path, weights", [("fast", (1.0, 1.0)), ("textbook", (1.5, 0.5))])
def test_kto_equals_the_formula_on_peft(tiny_chat_dir, kto_batch, monkeypatch, path, weights):
    """KTO's loss (a mean over completions), z0 and every LoRA gradient against the formula on
    transformers + peft log-probs, the reference from disable_adapter, rel <= 1e-5."""
    ours, twin = float64_pair(tiny_chat_dir, monkeypatch, seed=1)
    beta = 0.8
    loss_fn = kto.KTOLoss(ours, beta, *weights)
    with textbook_path(path == "textbook"):
        loss_fn.prepare_step([kto_batch], contextlib.nullcontext(), 4)
        loss_sum, stats = loss_fn(kto_batch)
    loss_sum.backward()

    policy, _ = hf_logps(twin, kto_batch)
    kl_rows = {"input_ids": kto_batch["kl_input_ids"], "labels": kto_batch["kl_labels"],
               "attention_mask": torch.ones_like(kto_batch["kl_input_ids"])}  # right padding: it changes nothing
    policy_kl, _ = hf_logps(twin, kl_rows)
    with torch.no_grad(), twin.disable_adapter():
        ref, _ = hf_logps(twin, kto_batch)
        ref_kl, _ = hf_logps(twin, kl_rows)
    desirable = kto_batch["desirable"]
    losses, z0 = paper_kto(policy, ref, policy_kl.detach(), ref_kl, desirable, beta, *weights)
    losses.sum().backward()
    assert z0.item() > 0.01  # the clamp does not hide the estimate: z0 shifts every reward
    assert loss_fn.kl.item() == pytest.approx(z0.item(), rel=1e-5)
    assert loss_sum.item() == pytest.approx(losses.sum().item(), rel=1e-5)
    r = (beta * (policy - ref)).detach()
    d, u = desirable.double(), (~desirable).double()
    expected = torch.stack([(r * d).sum(), (r * u).sum(), d.sum(), u.sum(), (policy.detach() * d).sum(),
                            (policy.detach() * u).sum(), 4 * z0])
    assert torch.allclose(stats, expected, rtol=1e-5, atol=1e-8), (stats, expected)
    assert_grads_match(ours, twin)
    means = loss_fn.metrics(stats.tolist(), 4)
    assert means["kl"] == pytest.approx(z0.item(), rel=1e-5)
    assert means["rewards_chosen"] == pytest.approx((r * d).sum().item() / 2, rel=1e-5)


# ----------------------------------------------------------------------------- TRL's own loss code

def test_the_losses_equal_trls_on_the_same_logps():
    """ORPO's odds-ratio term, SimPO's and KTO's losses and rewards equal what TRL's trainers
    compute on the same float64 log-probs (its methods called on a stand-in self)."""
    trl_reference = pytest.importorskip("trl_reference")
    torch.manual_seed(0)
    avg_w, avg_l = -torch.rand(6, dtype=torch.float64) * 3 - 0.05, -torch.rand(6, dtype=torch.float64) * 3 - 0.05
    losses, rw, rl, log_sigmoid, ratio, _ = reference_free.orpo_losses(avg_w, avg_l, 0.3)
    theirs = trl_reference.trl_orpo(avg_w, avg_l, 0.3)
    torch.testing.assert_close(losses + avg_w, -theirs["losses"], rtol=1e-12, atol=1e-12)  # ours adds the NLL
    torch.testing.assert_close(rw, theirs["chosen_rewards"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rl, theirs["rejected_rewards"], rtol=1e-12, atol=1e-12)
    assert log_sigmoid.mean().item() == pytest.approx(float(theirs["log_odds_ratio"]), rel=1e-12)
    assert ratio.mean().item() == pytest.approx(float(theirs["log_odds_chosen"]), rel=1e-12)

    losses, rw, rl = reference_free.simpo_losses(avg_w, avg_l, 2.5, 1.2)
    theirs = trl_reference.trl_simpo(avg_w, avg_l, 2.5, 1.2)
    for a, b in ((losses, "losses"), (rw, "chosen_rewards"), (rl, "rejected_rewards")):
        torch.testing.assert_close(a, theirs[b], rtol=1e-12, atol=1e-12)

    policy, ref = -torch.rand(8, dtype=torch.float64) * 20, -torch.rand(8, dtype=torch.float64) * 20
    policy_kl, ref_kl = -torch.rand(8, dtype=torch.float64) * 20, -torch.rand(8, dtype=torch.float64) * 20
    desirable = torch.tensor([True, False] * 4)
    z0 = (policy_kl - ref_kl).mean().clamp(min=0)
    losses, rewards = kto.kto_losses(policy, ref, z0, desirable, 0.3, 1.5, 0.7)
    theirs = trl_reference.trl_kto(policy[desirable], policy[~desirable], policy_kl, ref[desirable], ref[~desirable],
                                   ref_kl, 0.3, 1.5, 0.7)
    torch.testing.assert_close(torch.cat([losses[desirable], losses[~desirable]]), theirs["losses"],
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rewards[desirable], theirs["chosen_rewards"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rewards[~desirable], theirs["rejected_rewards"], rtol=1e-12, atol=1e-12)
    assert z0.item() == pytest.approx(float(theirs["kl"]), rel=1e-12)


# ----------------------------------------------------------------------------- runs

def run_config(model_dir, path, out, objective, **kw):
    beta = {"orpo": dict(orpo_lambda=0.5), "simpo": dict(simpo_beta=2.0, simpo_gamma=0.5),
            "kto": dict(kto_beta=0.5)}[objective]
    return config(model_dir, path, out, objective=objective, lr=5e-3, **{**beta, **kw})


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_accumulation_equals_big_batch(tiny_chat_dir, pair_data, kto_data, tmp_path, objective):  # noqa: F811
    """4 micro-batches of 1 equal 1 of 4: the loss is a mean over the step's pairs (completions),
    and KTO's z0 is the step's, not a micro-batch's. Step 1's figures agree to float32 rounding of
    sums in other orders, the adapters after 4 steps as closely as DPO's do."""
    path = kto_data if objective == "kto" else pair_data
    big, small = tmp_path / "big", tmp_path / "small"
    train(run_config(tiny_chat_dir, path, big, objective, micro_batch_size=4, grad_accum=1))
    train(run_config(tiny_chat_dir, path, small, objective, micro_batch_size=1, grad_accum=4))
    first, second = metrics(big)[0], metrics(small)[0]
    for k in ("loss", "grad_norm", "rewards_chosen", "rewards_rejected", "logps_chosen", "kl"):
        if k in first:
            assert first[k] == pytest.approx(second[k], rel=1e-5, abs=1e-7), k
    assert ("kl" in first) == (objective == "kto")
    a, b = adapter(big), adapter(small)
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    beyond = torch.cat([((a[k] - b[k]).abs() > 5e-7 + 1e-5 * b[k].abs()).flatten() for k in a])
    assert diff.max() <= 1e-4 and beyond.float().mean() <= 1e-3, (diff.max(), beyond.sum())
    assert any(x.abs().max() > 1e-3 for x in a.values())


@pytest.mark.parametrize("objective, precompute", [("orpo", False), ("simpo", False), ("kto", False),
                                                   ("kto", True)])
def test_resume_is_exact(tiny_chat_dir, pair_data, kto_data, tmp_path, objective, precompute):  # noqa: F811
    path = kto_data if objective == "kto" else pair_data
    kw = dict(max_steps=4, save_every=2, keep_checkpoints=5, lora_dropout=0.1, micro_batch_size=2, grad_accum=2,
              precompute_ref=precompute)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(run_config(tiny_chat_dir, path, full, objective, **kw))
    assert (full / "ref_logps.safetensors").is_file() == precompute
    cut_at_step_2(full, cut)
    train(run_config(tiny_chat_dir, path, cut, objective, resume=True, **kw))
    figures = lambda out: [(m["step"], m["loss"], m["grad_norm"], m.get("reward_margin"), m.get("kl"))
                           for m in metrics(out)]
    assert figures(cut) == figures(full)
    a, b = adapter(full), adapter(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_metrics_show_the_preference_learned(tiny_chat_dir, pair_data, kto_data, tmp_path, objective):  # noqa: F811
    """Each objective's metrics in metrics.jsonl and TensorBoard; training separates the replies."""
    path = kto_data if objective == "kto" else pair_data
    out = tmp_path / "run"
    train(run_config(tiny_chat_dir, path, out, objective, max_steps=6, val_fraction=0.25, eval_every=3))
    rows = metrics(out)
    last = rows[-1]
    names = {"orpo": ("reward_accuracy", "log_odds_ratio", "log_odds_chosen", "nll_loss"),
             "simpo": ("reward_accuracy",), "kto": ("kl", "val_kl")}[objective]
    for k in ("rewards_chosen", "rewards_rejected", "reward_margin", "logps_chosen", "val_reward_margin", *names):
        assert k in last, k
    assert last["reward_margin"] > rows[1]["reward_margin"]
    assert last["val_reward_margin"] > rows[0]["val_reward_margin"]
    if objective == "kto":  # the first evaluation is at the reference: every reward and z0 are 0
        assert rows[0]["val_kl"] == pytest.approx(0.0, abs=1e-6)
        assert rows[0]["val_loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0), weights 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/reward_margin", "eval/val_reward_margin"} <= set(events.Tags()["scalars"])


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("args, message", [
    (["--objective", "kto", "--dpo-beta", "0.2"], "--dpo-beta is for --objective dpo, not kto"),
    (["--objective", "dpo", "--kto-beta", "0.2"], "--kto-beta is for --objective kto, not dpo"),
    (["--orpo-lambda", "0.2"], "--orpo-lambda is for --objective orpo, not sft"),
    (["--objective", "orpo", "--simpo-gamma", "0.2"], "--simpo-gamma is for --objective simpo, not orpo"),
    (["--objective", "simpo", "--precompute-ref"], "--precompute-ref is for --objective dpo or kto, not simpo"),
    (["--objective", "kto", "--data", str(ROOT / "examples" / "preferences.jsonl")],
     'needs unpaired records {"prompt", "completion", "label"}'),
    (["--objective", "orpo", "--data", str(ROOT / "examples" / "train.json")],
     'needs preference records {"prompt", "chosen", "rejected"}'),
    (["--objective", "kto", "--pack"], "does not pack rows"),
    (["--objective", "simpo", "--simpo-beta", "0"], "--simpo-beta 0.0: must be in (0, inf)"),
    (["--objective", "kto", "--kto-undesirable-weight", "-1"], "--kto-undesirable-weight -1.0: must be in (0, inf)"),
])
def test_settings_refuse_what_an_objective_does_not_take(args, message):
    from training.flags import parse_config
    from training.settings import TrainError
    with pytest.raises(TrainError, match=re.escape(message)):
        parse_config(args)


def test_demo_defaults_and_the_old_flag_name(capsys):
    from training.flags import parse_config
    from training.settings import DEMO_PREFERENCES, DEMO_UNPAIRED
    for objective in ("orpo", "simpo", "kto"):
        cfg = parse_config(["--objective", objective])
        assert cfg.output_dir == f"runs/demo-{objective}"
        assert cfg.data == str(DEMO_UNPAIRED if objective == "kto" else DEMO_PREFERENCES)
    assert DEMO_UNPAIRED.is_file() and data.is_unpaired_file(DEMO_UNPAIRED)
    assert parse_config(["--objective", "dpo", "--dpo-precompute-ref"]).precompute_ref
    assert "--dpo-precompute-ref was renamed --precompute-ref" in capsys.readouterr().err


def test_a_run_made_with_the_old_setting_name_resumes(tmp_path):
    """run_config.json of an older DPO run says dpo_precompute_ref: --resume reads it as precompute_ref."""
    from training.flags import read_run_settings
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps({"objective": "dpo", "dpo_precompute_ref": True,
                                "defining": {"objective": "dpo", "dpo_precompute_ref": True}}))
    assert read_run_settings(path, "x")["precompute_ref"] is True
