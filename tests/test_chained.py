"""SFT, then preference tuning from its adapter without a merge (train.py --init-adapter):

- The run starts at its reference: step 1's DPO loss is ln 2 (KTO's evaluation 0.5, z0 0), since the
  reference policy is the base plus the SFT adapter, and so is the policy before its first update.
- What it saves is one adapter of the ORIGINAL base: our model and peft, each loading it alone on
  that base, compute what peft computes with the SFT adapter and the trained one applied together;
  it records the original base, so merge.py and chat.py refuse another base of the same shapes
  (and take it with --allow-other-base).
- --resume is exact (with and without precomputed reference log-probs), QLoRA trains from an
  adapter too, and two ranks (DDP, FSDP2) train what one process does.
- What cannot be chained is refused with one line.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import chat
import lora
from model import load_model
from model.errors import UserError
from test_dpo import pair_data  # noqa: F401 (a fixture)
from test_merge import run_merge
from test_parallel import assert_same_adapter, cut_at_step_2, run_ok
from test_train import adapter, config, metrics
from training.loop import train

SFT_TARGETS = "q_proj,v_proj"  # the SFT adapter on some layers, the DPO one on every linear layer
IDS = torch.tensor([[1, 40, 2000, 345, 77, 9000, 12, 2]])


@pytest.fixture(scope="module")
def sft_run(tiny_chat_dir, chat_data, tmp_path_factory):
    """A short SFT run: its adapter (r 4 on q, v) is what the preference runs start from."""
    out = tmp_path_factory.mktemp("sft") / "sft"
    train(config(tiny_chat_dir, chat_data, out, max_steps=4, lora_targets=SFT_TARGETS, lora_r=4, lora_alpha=16))
    return out


def chained(model_dir, pairs, out, sft, **kw):
    return config(model_dir, pairs, out, objective="dpo", dpo_beta=0.5, lr=5e-3, init_adapter=str(sft), **kw)


def hf_model(model_dir):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def trained_part(saved, out_dir, r: int):
    """The trained adapter alone, from the stacked file (its first r ranks), as a peft adapter."""
    config_ = json.loads((saved / "adapter_config.json").read_text())
    tensors = {k: (t[:r] if ".lora_A." in k else t[:, :r]).contiguous()
               for k, t in load_file(saved / "adapter_model.safetensors").items()}
    out_dir.mkdir()
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    scaling = config_["lora_alpha"] / config_["r"]
    (out_dir / "adapter_config.json").write_text(json.dumps({**config_, "r": r, "lora_alpha": scaling * r}))
    return out_dir


def test_chained_dpo_starts_at_ln2_and_saves_one_adapter_of_the_original_base(tiny_chat_dir, pair_data,  # noqa: F811
                                                                                sft_run, tmp_path, capsys):
    """Step 1's loss and the first evaluation are ln 2; the saved adapter (rank 4 + 4) on the
    original base equals peft with the SFT adapter and the trained part both active, in our
    model and in peft (float32, rel <= 1e-5: two float32 forwards of the same sum in other
    orders); merge.py and chat.py refuse a base of the same shapes with other weights."""
    out = tmp_path / "dpo"
    train(chained(tiny_chat_dir, pair_data, out, sft_run / "adapter", max_steps=3, val_fraction=0.25))
    rows = metrics(out)
    assert rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[-1]["loss"] < rows[1]["loss"]
    saved = out / "adapter"
    config_ = json.loads((saved / "adapter_config.json").read_text())
    assert config_["r"] == 8
    record = json.loads((saved / lora.adapter.BASE_FILE).read_text())
    assert record == json.loads((sft_run / "adapter" / lora.adapter.BASE_FILE).read_text())  # the original base

    import peft
    both = peft.PeftModel.from_pretrained(hf_model(tiny_chat_dir), sft_run / "adapter", adapter_name="sft")
    both.load_adapter(trained_part(saved, tmp_path / "dpo-part", 4), adapter_name="dpo")
    both.base_model.set_adapter(["sft", "dpo"])
    with torch.no_grad():
        expected = both(input_ids=IDS).logits
        alone = peft.PeftModel.from_pretrained(hf_model(tiny_chat_dir), saved).eval()(input_ids=IDS).logits
        ours = load_model(tiny_chat_dir)
        lora.load_adapter(ours, saved)
        got = ours.eval()(IDS)
    sft_only = load_model(tiny_chat_dir)
    lora.load_adapter(sft_only, sft_run / "adapter")
    with torch.no_grad():
        assert (sft_only.eval()(IDS) - expected).norm() > 1e-3 * expected.norm()  # DPO moved it: a real test
    for logits in (alone, got):
        assert (logits - expected).norm() <= 1e-5 * expected.norm(), ((logits - expected).norm() / expected.norm())

    other = tmp_path / "other-base"  # the same shapes, one weight changed
    shutil.copytree(tiny_chat_dir, other)
    weights = next(other.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    code, _, err = run_merge(capsys, "--base", other, "--adapter", saved, "--output", tmp_path / "merged")
    assert code == 2 and "--allow-other-base" in err and not (tmp_path / "merged").exists()
    code, _, err = run_merge(capsys, "--base", other, "--adapter", saved, "--output", tmp_path / "merged",
                             "--allow-other-base")
    assert code == 0 and "warning" in err
    code = chat.main(["--model", str(other), "--adapter", str(saved), "--prompt", "x", "--device", "cpu"])
    assert code == 2 and "--allow-other-base" in capsys.readouterr().err
    code, _, err = run_merge(capsys, "--base", tiny_chat_dir, "--adapter", saved, "--output", tmp_path / "ok")
    assert code == 0 and "warning" not in err, err
    with pytest.raises(UserError, match="pass --allow-other-base"):  # nor does a run start from it there
        train(chained(other, pair_data, tmp_path / "elsewhere", sft_run / "adapter"))


def test_kto_from_an_adapter_starts_at_its_reference(tiny_chat_dir, sft_run, tmp_path):
    """KTO's reference is the base plus the SFT adapter as well: the first evaluation has z0 = 0
    and every loss 1 - sigmoid(0) = 0.5."""
    from test_preference_objectives import RECORDS
    from test_dpo import write_jsonl
    rows = [{**r, "prompt": r["prompt"] if isinstance(r["prompt"], list) else f"{r['prompt']} ({i})"}
            for i in range(3) for r in RECORDS]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    out = tmp_path / "kto"
    train(config(tiny_chat_dir, path, out, objective="kto", kto_beta=0.5, lr=5e-3, max_steps=2, val_fraction=0.25,
                 init_adapter=str(sft_run)))  # a run directory: its final adapter
    first = metrics(out)[0]
    assert first["val_kl"] == pytest.approx(0.0, abs=1e-6) and first["val_loss"] == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("precompute, quantize", [(False, None), (True, None), (False, "nf4")])
def test_resume_is_exact(tiny_chat_dir, pair_data, sft_run, tmp_path, precompute, quantize):  # noqa: F811
    """A chained run cut at step 2 and resumed trains the uninterrupted one's figures and adapter
    bit for bit: the checkpoint holds the stacked adapter, split back onto the attached SFT one.
    QLoRA (an NF4 base) runs from the adapter too, from ln 2."""
    kw = dict(max_steps=4, save_every=2, keep_checkpoints=5, lora_dropout=0.1, micro_batch_size=2, grad_accum=2,
              precompute_ref=precompute, quantize=quantize)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(chained(tiny_chat_dir, pair_data, full, sft_run / "adapter", **kw))
    assert metrics(full)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    cut_at_step_2(full, cut)
    train(chained(tiny_chat_dir, pair_data, cut, sft_run / "adapter", resume=True, **kw))
    figures = lambda out: [(m["step"], m["loss"], m["grad_norm"], m["reward_margin"]) for m in metrics(out)]
    assert figures(cut) == figures(full)
    a, b = adapter(full), adapter(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode, precompute", [("ddp", False), ("fsdp", True)])
def test_two_ranks_equal_one_process(tiny_chat_dir, pair_data, sft_run, tmp_path, mode, precompute):  # noqa: F811
    """Under torchrun (gloo, 2 ranks) each rank attaches the whole SFT adapter (FSDP2: after its
    shards load) and trains what one process does."""
    from test_parallel import RUN
    kw = dict(RUN, precompute_ref=precompute)
    single, ranks = tmp_path / "single", tmp_path / mode
    train(chained(tiny_chat_dir, pair_data, single, sft_run / "adapter", micro_batch_size=4, **kw))
    run_ok(chained(tiny_chat_dir, pair_data, ranks, sft_run / "adapter", micro_batch_size=2, parallel=mode, **kw))
    assert_same_adapter(adapter(ranks), adapter(single))
    assert [m["loss"] for m in metrics(ranks) if "loss" in m] == pytest.approx(
        [m["loss"] for m in metrics(single) if "loss" in m], rel=1e-5)


def test_what_cannot_be_chained_is_refused(tiny_chat_dir, pair_data, sft_run, tmp_path):  # noqa: F811
    from training.flags import parse_config
    with pytest.raises(UserError, match="include them in --lora-targets"):
        train(chained(tiny_chat_dir, pair_data, tmp_path / "a", sft_run / "adapter", lora_targets="o_proj"))
    with pytest.raises(UserError, match="--init-adapter does not combine with --dora"):
        parse_config(["--init-adapter", str(sft_run), "--dora"])
    with pytest.raises(UserError, match="adapter_config.json: not found"):
        parse_config(["--init-adapter", str(tmp_path)])
    with pytest.raises(UserError, match="--init-adapter is for training"):
        parse_config(["--init-adapter", str(sft_run), "--eval-only", "--adapter", str(sft_run)])
