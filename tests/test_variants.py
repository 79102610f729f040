"""The LoRA variants train.py offers beside plain LoRA, each against its reference:

- LoRA+ (--loraplus-lr-ratio): every trainable parameter gets the learning rate PEFT's
  create_loraplus_optimizer gives it; B's groups follow the schedule at ratio x lr; a first step
  from B = 0 moves B by ratio x lr, where plain LoRA moves it by lr.
- DoRA (--dora): init, logits and the gradients of A, B and m equal PEFT's use_dora=True, with and
  without dropout; adapters move both ways; merge_lora_ and merge.py keep the logits; disabling the
  adapter gives the base exactly; a run trains m and reports its gradient.
- PiSSA (--lora-init pissa): A0, B0 and the residual base equal PEFT's up to singular-vector sign;
  the randomized variant finds the principal components; the saved adapter (rank 2r) applied to the
  original base equals the trained model, here, in PEFT and merged; a resumed run is exact.
- NEFTune (--neftune-alpha): the noise equals transformers' neftune_post_forward_hook's on the same
  random stream, has the stated bound alpha / sqrt(L d) and a uniform spread, and is off in
  evaluation and generation; a run with it is exact on resume.
"""

import json
import math

import peft
from peft.optimizers import create_loraplus_optimizer
import pytest
import torch
import torch.nn as nn
import transformers
from transformers.integrations.neftune import neftune_post_forward_hook

import lora
from training import loop as train_loop
from conftest import save_tiny_hf
from model import load_model
from model.generate import generate
from model.llama import neftune_noise
from test_parallel import cut_at_step_2
from test_train import adapter, config, metrics
from training.loop import train
from training.phases import build_optimizer


# ----------------------------------------------------------------------------- LoRA+

def test_loraplus_groups_equal_peft(tmp_path):
    """Each trainable parameter's learning rate and weight decay, ours against PEFT's LoRA+
    optimizer on the same tiny model and targets (names mapped: PEFT's `.default` adapter)."""
    path = save_tiny_hf(tmp_path / "tiny")
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = load_model(path)
    lora.inject_lora(ours, lora.LoRAConfig(r=4, alpha=8, targets=targets))
    cfg = config(path, tmp_path / "unused.jsonl", tmp_path / "out", lr=2e-4, loraplus_lr_ratio=16.0,
                 weight_decay=0.01)
    optimizer, _ = build_optimizer(cfg, ours, "cpu", torch.float32)
    names = {id(p): n for n, p in ours.named_parameters()}
    got = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}

    twin = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    reference = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16.0,
                                                          loraplus_weight_decay=0.01)
    peft_names = {id(p): n for n, p in twin.named_parameters()}
    expected = {peft_names[id(p)].removeprefix("base_model.model.").replace(".default", ""): (g["lr"], g["weight_decay"])
                for g in reference.param_groups for p in g["params"]}
    assert len(got) == 2 * 3 * 2 and got.keys() == expected.keys()  # A and B of 3 targets, 2 layers
    for name in got:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name
    assert {lr for lr, _ in got.values()} == {2e-4, 16 * 2e-4}


def test_loraplus_first_step_moves_b_at_ratio_times_lr(tiny_chat_dir, chat_data, tmp_path):
    """From B = 0, AdamW's first step moves every element with a gradient by lr (m / sqrt(v) is
    +-1 up to eps): B by ratio x lr with LoRA+, by lr without; A has no gradient yet (B = 0)."""
    moved = {}
    for ratio in (1.0, 16.0):
        out = tmp_path / f"ratio{ratio:g}"
        train(config(tiny_chat_dir, chat_data, out, max_steps=1, lr=1e-4, lr_schedule="constant",
                     loraplus_lr_ratio=ratio))
        B = [t for k, t in adapter(out).items() if ".lora_B." in k]
        moved[ratio] = max(t.abs().max().item() for t in B)
        assert metrics(out)[-1]["lr"] == pytest.approx(1e-4)  # the logged lr is A's
    assert moved[1.0] == pytest.approx(1e-4, rel=1e-3)  # eps 1e-8 against gradients ~1e-3 and up
    assert moved[16.0] == pytest.approx(16e-4, rel=1e-3)


def test_loraplus_schedule_keeps_the_ratio(tiny_chat_dir, chat_data, tmp_path):
    """Warmup and cosine scale both groups: at every step B's lr is ratio x A's."""
    out = tmp_path / "run"
    seen = []
    real = train_loop.train_step

    def spy(loss_fn, batches, optimizer, *args):
        seen.append(sorted({(g["lr"], g["lr_ratio"]) for g in optimizer.param_groups}))
        return real(loss_fn, batches, optimizer, *args)

    train_loop.train_step = spy
    try:
        train(config(tiny_chat_dir, chat_data, out, max_steps=4, warmup_steps=2, loraplus_lr_ratio=8.0))
    finally:
        train_loop.train_step = real
    lrs = [m["lr"] for m in metrics(out)]
    assert len(seen) == 4 and len(set(lrs)) > 1  # warmup 0.005, 0.01, then cosine 0.01, 0.005
    for step, (lr, groups) in enumerate(zip(lrs, seen)):
        assert groups == [(pytest.approx(lr), 1.0), (pytest.approx(8 * lr), 8.0)], step


# ----------------------------------------------------------------------------- NEFTune

def test_neftune_noise_equals_transformers_hook():
    """The same noise as transformers' hook draws from the same random stream. The bound is
    alpha / sqrt(L d) computed in float64 here and in float32 there: rel 1e-6 covers that. On
    zero embeddings the outputs are the noise itself (on others, x + noise rounds to x's ulps)."""
    x = torch.zeros(2, 7, 64)
    embed = torch.nn.Embedding(1, 1)
    embed.neftune_noise_alpha = 5.0
    torch.manual_seed(3)
    expected = neftune_post_forward_hook(embed.train(), None, x)
    torch.manual_seed(3)
    ours = neftune_noise(x, 5.0)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    assert ours.abs().min() > 0


def test_neftune_noise_has_the_stated_scale():
    """U(-a, a) with a = alpha / sqrt(L d): never beyond a, reaching it, mean 0, variance a^2 / 3
    (within 3% on 2^20 draws: the sample variance's standard error is 0.09% of it)."""
    x = torch.zeros(4, 512, 512, dtype=torch.float64)
    alpha = 5.0
    a = alpha / math.sqrt(512 * 512)
    noise = neftune_noise(x, alpha)
    assert noise.abs().max() <= a and noise.abs().max() > 0.999 * a
    assert abs(noise.mean().item()) < 0.01 * a
    assert noise.var().item() == pytest.approx(a * a / 3, rel=0.03)


def test_neftune_is_training_only(tmp_path):
    """The model adds the noise in train mode only: eval logits and generated tokens equal the
    noiseless model's."""
    model = load_model(save_tiny_hf(tmp_path / "tiny"))
    ids = torch.randint(0, 100, (2, 9))
    clean = model.eval()(ids)
    model.neftune_alpha = 5.0
    assert not torch.equal(model.train()(ids), clean)
    torch.testing.assert_close(model.eval()(ids), clean, rtol=0, atol=0)
    model.neftune_alpha = 0.0
    reference = list(generate(model, ids[0].tolist(), 6, ()))
    model.neftune_alpha = 5.0
    assert list(generate(model, ids[0].tolist(), 6, ())) == reference


def test_neftune_run_trains_differently_and_resumes_exactly(tiny_chat_dir, chat_data, tmp_path):
    """--neftune-alpha changes the run (the noise is really applied), its evaluation is noiseless
    (the first val loss equals the plain run's), and stopped and resumed it is the same run."""
    plain, noisy, cut = tmp_path / "plain", tmp_path / "noisy", tmp_path / "cut"
    kw = dict(max_steps=4, val_fraction=0.25, save_every=2, neftune_alpha=5.0)
    train(config(tiny_chat_dir, chat_data, plain, **{**kw, "neftune_alpha": 0.0}))
    train(config(tiny_chat_dir, chat_data, noisy, **kw))
    assert metrics(noisy)[0]["val_loss"] == metrics(plain)[0]["val_loss"]  # step 0: before training
    assert metrics(noisy)[1]["loss"] != metrics(plain)[1]["loss"]
    cut_at_step_2(noisy, cut)  # as if it had stopped after its step-2 checkpoint
    train(config(tiny_chat_dir, chat_data, cut, **kw, resume=True))
    figures = lambda out: [(m["step"], m.get("loss"), m.get("val_loss")) for m in metrics(out)]
    assert figures(cut) == figures(noisy)
    a, b = adapter(noisy), adapter(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- DoRA

class SeededMask(nn.Module):
    """Dropout with a mask that depends only on the input's shape and a seed: the same mask in
    our layer and in PEFT's, so the dropout form of DoRA can be compared (not an nn.Identity, so
    PEFT takes its dropout branch)."""

    def __init__(self, seed):
        super().__init__()
        self.seed = seed

    def forward(self, x):
        keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(self.seed)) >= 0.5
        return x * keep * 2.0


def dora_pair(path, targets, dropout: bool):
    """Our DoRA model and PEFT's use_dora=True twin on one tiny checkpoint, A, B and m random and equal."""
    ours = load_model(path)
    lora.inject_lora(ours, lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets, dora=True))
    twin = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                               peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                               use_dora=True))
    g = torch.Generator().manual_seed(0)
    inits = []
    with torch.no_grad():
        for i, (name, m) in enumerate(lora.lora_modules(ours).items()):
            theirs = twin.base_model.model.get_submodule(name)
            inits.append((m.lora_magnitude_vector.clone(), theirs.lora_magnitude_vector["default"].weight.clone()))
            for mine, peft_weight in ((m.lora_A.weight, theirs.lora_A["default"].weight),
                                      (m.lora_B.weight, theirs.lora_B["default"].weight),
                                      (m.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)):
                noise = torch.randn(mine.shape, generator=g) * 0.05
                mine.copy_(mine + noise if mine.ndim == 1 else noise)  # m stays near ||W0||
                peft_weight.copy_(mine)
            if dropout:
                m.lora_dropout, theirs.lora_dropout["default"] = SeededMask(i), SeededMask(i)
    return ours.train(), twin.train(), inits


@pytest.mark.parametrize("dropout", [False, True])
def test_dora_logits_and_grads_equal_peft(tmp_path, dropout):
    """DoRA's init (m = ||W0||_row), logits and the gradients of every A, B and m against PEFT's
    use_dora=True, in float32, on the same weights and dropout masks. rel 1e-5: both are float32
    through two layers, the norm summed in a different order; measured: logits 5e-7 of their
    largest, gradients 4e-6 of each tensor's largest."""
    path = save_tiny_hf(tmp_path / "tiny", "qwen2")  # q, k, v biases: DoRA's bias handling
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    ours, twin, inits = dora_pair(path, targets, dropout)
    for mine, theirs in inits:
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, expected = ours(ids), twin(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    (logits.square().mean()).backward()
    (expected.square().mean()).backward()
    compared = 0
    for name, m in lora.lora_modules(ours).items():
        theirs = twin.base_model.model.get_submodule(name)
        for mine, peft_weight in ((m.lora_A.weight, theirs.lora_A["default"].weight),
                                  (m.lora_B.weight, theirs.lora_B["default"].weight),
                                  (m.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)):
            scale = peft_weight.grad.abs().max()
            assert scale > 0
            torch.testing.assert_close(mine.grad, peft_weight.grad, rtol=1e-5, atol=1e-5 * scale)
            compared += 1
    assert compared == 3 * 4 * 2


def test_dora_adapter_moves_between_us_and_peft_and_merges(tmp_path, capsys):
    """An adapter saved here loads in PEFT with equal logits; one PEFT saved loads here, merges
    in place (merge_lora_) and through merge.py, each with the unmerged logits."""
    import merge
    path = save_tiny_hf(tmp_path / "tiny")
    targets = ["q_proj", "k_proj", "gate_proj", "down_proj"]
    ours, twin, _ = dora_pair(path, targets, dropout=False)
    ours.eval(), twin.eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    lora.save_adapter(ours, lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets, dora=True),
                      tmp_path / "ours", str(path))
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path),
                                            tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(ids), rtol=1e-5, atol=1e-5)

    twin.save_pretrained(tmp_path / "peft")
    here = load_model(path)
    assert lora.load_adapter(here, tmp_path / "peft").dora
    with torch.no_grad():
        reference = twin(input_ids=ids).logits
        torch.testing.assert_close(here(ids), reference, rtol=1e-5, atol=1e-5)
        lora.merge_lora_(here)
        assert not lora.lora_modules(here)
        torch.testing.assert_close(here(ids), reference, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert merge.main(["--base", str(path), "--adapter", str(tmp_path / "peft"), "--output", str(tmp_path / "merged")]) == 0
    assert "(DoRA)" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged")(ids), reference, rtol=1e-5, atol=1e-5)


def test_dora_disabled_is_the_base(tmp_path):
    """lora.adapter_disabled gives the base model exactly, DoRA's rescaling included."""
    path = save_tiny_hf(tmp_path / "tiny")
    ours, _, _ = dora_pair(path, ["q_proj", "down_proj"], dropout=False)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), lora.adapter_disabled(ours.eval()):
        disabled = ours(ids)
    with torch.no_grad():
        assert not torch.equal(ours(ids), disabled)
        torch.testing.assert_close(disabled, load_model(path)(ids), rtol=0, atol=0)


def test_dora_run_shows_the_magnitude_gradient(tiny_chat_dir, chat_data, tmp_path, capsys):
    """train.py --dora: the magnitude vectors train (float32, in the adapter under PEFT's key),
    --debug-grads reports their gradient, and the run's adapter loads in PEFT with equal logits."""
    out = tmp_path / "run"
    train(config(tiny_chat_dir, chat_data, out, max_steps=2, dora=True, debug_grads=True,
                 lora_targets="q_proj,v_proj"))
    err = capsys.readouterr().err
    assert "|grad m|" in err and "|dm|/|m|" in err
    tensors = adapter(out)
    magnitudes = {k: t for k, t in tensors.items() if k.endswith(".lora_magnitude_vector")}
    assert len(magnitudes) == 2 * 2 and all(t.dtype == torch.float32 for t in magnitudes.values())
    fresh = load_model(tiny_chat_dir)
    lora.inject_lora(fresh, lora.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], dora=True))
    start = {f"base_model.model.{n}.lora_magnitude_vector": m.lora_magnitude_vector for n, m in
             lora.lora_modules(fresh).items()}
    assert any(not torch.equal(magnitudes[k], start[k]) for k in magnitudes)  # m moved
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(2))
    here = load_model(tiny_chat_dir)
    lora.load_adapter(here, out / "adapter")
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_dir),
                                            out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(here.eval()(ids), theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- PiSSA

def test_pissa_start_equals_peft(tmp_path):
    """A0, B0 and the residual base of every layer against PEFT's init_lora_weights="pissa", up to
    the sign of each singular pair (the SVD's choice); and at the start the model is the base model.
    Both take the same float32 SVD; rel 1e-5 covers the different order of the residual's matmul."""
    path = save_tiny_hf(tmp_path / "tiny")
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = load_model(path)
    lora.inject_lora(ours, lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets))
    lora.pissa_init_(lora.lora_modules(ours))
    twin = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa"))
    for name, m in lora.lora_modules(ours).items():
        theirs = twin.base_model.model.get_submodule(name)
        A, B = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
        sign = torch.sign((m.lora_A.weight * A).sum(dim=1))  # (r,): +-1 per singular pair
        assert sign.abs().min() == 1
        torch.testing.assert_close(m.lora_A.weight * sign[:, None], A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.lora_B.weight * sign[None, :], B, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.weight, theirs.base_layer.weight, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(m.weight, load_model(path).get_submodule(name).weight)  # the base changed
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), load_model(path)(ids), rtol=1e-5, atol=1e-5)


def test_pissa_niter_finds_the_principal_components():
    """pissa_niter_4 (randomized SVD) on a matrix whose singular values fall tenfold each: s B0 A0 is
    the best rank-r approximation (within 1e-4 of the exact SVD's: the subspace error of randomized
    SVD shrinks as (s_5 / s_4)^(2 niter + 1) = 1e-9, so float32 rounding is what is left), and the
    residual plus it is W."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(48, 32, generator=g))
    V, _ = torch.linalg.qr(torch.randn(40, 32, generator=g))
    W = U @ torch.diag(10.0 ** -torch.arange(32.0)) @ V.t()  # (48, 40)
    layer = lora.LoRALinear(nn.Linear(40, 48, bias=False), r=4, alpha=8)
    with torch.no_grad():
        layer.weight.copy_(W)
    exact_A, exact_B = lora.pissa.principal_components(W, 4, layer.scaling)
    lora.pissa_init_({"layer": layer}, niter=4)
    low_rank = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    exact = layer.scaling * exact_B @ exact_A
    assert (low_rank - exact).norm() / exact.norm() < 1e-4
    torch.testing.assert_close(layer.weight + low_rank, W, rtol=0, atol=1e-6)


def assert_close_to_scale(actual, expected, rel=1e-5):
    """max |actual - expected| within rel of max |expected|: logits near zero carry the absolute
    rounding of the large ones, so an elementwise relative bound would measure nothing."""
    assert (actual - expected).abs().max() <= rel * expected.abs().max()


@pytest.fixture(scope="module")
def pissa_run(tiny_chat_dir, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pissa") / "run"
    kw = dict(max_steps=4, save_every=2, lora_init="pissa", lora_targets="q_proj,v_proj,down_proj")
    summary = train(config(tiny_chat_dir, chat_data, out, **kw))
    return out, kw, summary["model"]


def test_pissa_adapter_applies_to_the_original_base(tiny_chat_dir, pissa_run, tmp_path, capsys):
    """The trained PiSSA model (the residual base, A and B) equals the original base plus the saved
    adapter: loaded here, loaded by PEFT, and merged by merge.py. The adapter is PEFT's rank-2r plain
    LoRA with the same scaling."""
    import merge
    out, _, trained = pissa_run
    config_json = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config_json["r"], config_json["lora_alpha"], config_json["init_lora_weights"]) == (8, 16, True)
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = trained.eval()(ids)
        assert not torch.allclose(expected, load_model(tiny_chat_dir)(ids), atol=1e-3)  # it trained
        here = load_model(tiny_chat_dir)
        lora.load_adapter(here, out / "adapter")
        assert_close_to_scale(here(ids), expected)
        theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_dir),
                                                out / "adapter").eval()
        assert_close_to_scale(theirs(input_ids=ids).logits, expected)
    assert merge.main(["--base", str(tiny_chat_dir), "--adapter", str(out / "adapter"),
                       "--output", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        assert_close_to_scale(load_model(tmp_path / "merged")(ids), expected)


def test_pissa_resume_is_exact(tiny_chat_dir, chat_data, pissa_run, tmp_path):
    """Stopped after step 2 and resumed, a PiSSA run is the same run: the checkpoint's rank-2r
    adapter is split back into PiSSA's start (rebuilding the residual base) and the trained A, B."""
    full, kw, _ = pissa_run
    cut = tmp_path / "cut"
    cut_at_step_2(full, cut)
    train(config(tiny_chat_dir, chat_data, cut, **kw, resume=True))
    figures = lambda out: [(m["step"], m.get("loss"), m.get("grad_norm")) for m in metrics(out)]
    assert figures(cut) == figures(full)
    a, b = adapter(full), adapter(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sweeps_vary_the_variants():
    """A sweep grid over the variants' flags, every combination checked before the first run."""
    from training import flags, settings
    from training import sweep
    cfg = flags.parse_config(["--sweep", "dora=true,false", "neftune_alpha=0,5", "loraplus_lr_ratio=1,16",
                                 "--max-steps", "2"])
    combos = sweep.settings(cfg)
    assert len(combos) == 8 and {"dora": True, "neftune_alpha": 5.0, "loraplus_lr_ratio": 16.0} in combos
    with pytest.raises(settings.TrainError, match="--lora-init pissa_niter_2 does not combine with"):
        sweep.settings(flags.parse_config(["--sweep", "dora=true,false", "lora_init=default,pissa_niter_2"]))
