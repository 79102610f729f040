"""A frozen init adapter under a trained LoRA (lora/chain.py): DPO from an SFT adapter, unmerged.

Proves, on a tiny random 2-layer Llama with an SFT adapter written by peft (q, v; rank 4; rsLoRA;
random B) under a trained LoRA (all linear layers; rank 3; alpha 5): the model computes what peft
computes with both adapters loaded and active, and with the trained LoRA switched off
(lora.adapter_disabled) what peft computes with the SFT adapter alone (float64); the fast path
equals the textbook path forward and backward, in the model and in a group of layers with dropout;
a bf16 base rounds the sum once and runs under autocast; the saved adapter is one plain LoRA of the
original base that peft, load_adapter on a plain model and merge_lora_ all turn into the same
model; --resume's load splits it back exactly and refuses another init adapter; an NF4 base with an
init adapter trains, and its reference is the NF4 base + SFT; every refusal is one line naming the
adapter.
"""

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import lora
from conftest import assert_logits_match, rel, save_tiny_hf
from lora import chain
from model.fused import textbook_path
from model.load import load_model
from test_lora import IDS, group_of_three, loss_of, randomize_lora

SFT_TARGETS = ["q_proj", "v_proj"]
SFT = dict(r=4, lora_alpha=6, use_rslora=True)  # s0 = 6 / sqrt(4) = 3
CFG = lora.LoRAConfig(r=3, alpha=5, dropout=0.0, targets="all-linear")  # s = 5 / 3: no power of two
STACKED_R = 3 + 4
Q = "model.layers.0.self_attn.q_proj"  # a layer both adapters adapt
Q_A = f"base_model.model.{Q}.lora_A.weight"
# float64 against float64: the same sums in other orders (measured ~1e-15 apart); a missing or doubled
# adapter term moves the logits by 1e-2 of their scale or more.
TIGHT = 1e-10


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The base (widths multiples of 64, as NF4 on the CPU needs), two SFT adapters written by peft
    (random A and B: init_lora_weights=False; another seed for the second), and the trained LoRA
    alone as a plain adapter."""
    import peft
    import transformers
    root = tmp_path_factory.mktemp("chain")
    base = save_tiny_hf(root / "base", intermediate_size=128)
    for name, seed in (("sft", 0), ("sft-other", 1)):
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = peft.LoraConfig(target_modules=SFT_TARGETS, init_lora_weights=False, **SFT)
        peft.get_peft_model(hf, config).save_pretrained(root / name)
    lora.save_adapter(chained(base, init=None), CFG, root / "dpo")
    return {"base": base, "sft": root / "sft", "sft-other": root / "sft-other", "dpo": root / "dpo"}


def chained(base, init, dtype=torch.float32, quantize=None):
    """Our model: base + the init adapter in `init` (frozen) + the trained LoRA (random A, B, the same
    for every call), in eval mode."""
    model = load_model(base)
    lora.inject_lora(model, CFG, quantize=quantize)
    randomize_lora(model, seed=1, std=0.1)
    if init is not None:
        lora.attach_init_adapter(model, init)
    if dtype != torch.float32:
        model.to(dtype)  # buffers too: A0, B0 in float64 for the float64 tests
    return model.eval()


def hf_base(dirs, dtype):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=dtype)


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    """transformers' RMSNorm normalises in float32 whatever the dtype, which alone parts it from the
    float64 truth by ~1e-7: here it runs in the input's dtype, the formula unchanged."""
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


# ----------------------------------------------------------------------------- what the model computes

def test_chained_model_equals_peft_with_both_adapters(dirs, float64_rmsnorm):
    """peft with the SFT and the trained adapter loaded as two named adapters, both active, adds both
    updates on each layer: our chained model's logits; with only "sft" active, ours under
    adapter_disabled (the DPO reference policy)."""
    import peft
    ours = chained(dirs["base"], dirs["sft"], torch.float64)
    theirs = peft.PeftModel.from_pretrained(hf_base(dirs, torch.float64), dirs["sft"], adapter_name="sft")
    theirs.load_adapter(dirs["dpo"], adapter_name="dpo")
    theirs = theirs.double().eval()
    theirs.base_model.set_adapter(["sft", "dpo"])
    with torch.no_grad():
        logits = ours(IDS)
        assert rel(logits, theirs(input_ids=IDS).logits) < TIGHT
        with lora.adapter_disabled(ours):
            reference = ours(IDS)
        theirs.base_model.set_adapter("sft")
        assert rel(reference, theirs(input_ids=IDS).logits) < TIGHT
        # Each adapter matters: without the SFT one, or without the trained one, the logits move.
        assert rel(chained(dirs["base"], None, torch.float64)(IDS), logits) > 1e-2
        assert rel(reference, logits) > 1e-2
    q = lora.lora_modules(ours)[Q]
    assert "init_adapter=(r=4, scaling=3)" in repr(q)
    assert lora.lora_modules(ours)["model.layers.0.self_attn.o_proj"].init_A is None  # not in the SFT adapter
    assert set(q.state_dict()) == {"weight", "lora_A.weight", "lora_B.weight"}  # A0, B0: not persistent


@pytest.mark.parametrize("path", ["written-out", "op-by-op"])
def test_fast_path_equals_textbook_in_the_model(dirs, path, monkeypatch):
    """float64, init adapters on q and v: the fast path (LoRAGroup, or op by op as NF4 and bf16 bases
    run) gives the textbook's logits and gradients of A, B and of the input embeddings (through the
    init term too); A0 and B0 get none."""
    if path == "op-by-op":
        monkeypatch.setattr(lora.fused.LoRAGroup, "dtype_for", staticmethod(lambda x, layers: None))
    model = chained(dirs["base"], dirs["sft"], torch.float64)
    embed = model.model.embed_tokens.weight.requires_grad_()
    params = [embed, *[p for m in lora.lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]]

    def run():
        logits = model(IDS)
        return [logits, *torch.autograd.grad(loss_of(logits, IDS), params)]

    fast = run()
    with textbook_path():
        textbook = run()
    for a, b in zip(fast, textbook, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)  # float64, sums reordered: ~1e-15
    assert all(not t.requires_grad for m in lora.lora_modules(model).values() for t in (m.init_A, m.init_B)
               if t is not None)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_group_with_init_adapters_matches_the_textbook(dropout):
    """forward_shared on q/k/v-like layers, two of three with an init adapter, with dropout on the
    trained LoRA only: outputs and gradients (x, A, B) of base(x) + s0 B0 A0 x + s B A dropout(x),
    written out here, with the same masks."""
    layers = group_of_three(dropout)
    g = torch.Generator().manual_seed(2)
    for m, r0 in zip(layers, (2, None, 5)):
        if r0:
            m.init_A = torch.randn(r0, 16, generator=g, dtype=torch.float64)
            m.init_B = torch.randn(m.out_features, r0, generator=g, dtype=torch.float64)
            m.init_scaling = 0.7
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    needs = [x, *[p for m in layers for p in (m.lora_A.weight, m.lora_B.weight)]]
    cotangents = [torch.randn(2, 5, m.out_features, dtype=torch.float64) for m in layers]

    def formula(m):
        init = 0 if m.init_A is None else m.init_scaling * x @ m.init_A.t() @ m.init_B.t()
        return m.base_forward(x) + init + m.scaling * m.lora_B(m.lora_A(m.lora_dropout(x)))

    outs = []
    for forward in (lambda: lora.LoRALinear.forward_shared(x, layers), lambda: [formula(m) for m in layers]):
        torch.manual_seed(1)
        out = forward()
        outs.append([*out, *torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cotangents)), needs)])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # float64, the same sums reordered


def test_bf16_base_with_an_init_adapter():
    """A bf16 base with float32 A, B, A0, B0: outside autocast both paths form the sum in float32
    and round it to bf16 once, so each is within one bf16 rounding of the float64 formula; under
    autocast the output is bf16 and A, B get float32 gradients."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(64, 32, dtype=torch.bfloat16), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    layer.init_A, layer.init_B, layer.init_scaling = torch.randn(2, 64) * 0.1, torch.randn(32, 2) * 0.1, 1.5
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    d = lambda t: t.double()
    exact = (d(layer.base_forward(x)) + 1.5 * d(x) @ d(layer.init_A).t() @ d(layer.init_B).t()
             + layer.scaling * d(x) @ d(layer.lora_A.weight).t() @ d(layer.lora_B.weight).t())
    with torch.no_grad():
        fast = layer(x)
        with textbook_path():
            textbook = layer(x)
    for out in (fast, textbook):
        # one bf16 rounding (2^-8 relative) on top of float32 sums (~1e-7): 2^-8 of each value's size
        assert out.dtype == torch.bfloat16 and ((d(out) - exact).abs() <= 2**-8 * exact.abs() + 1e-6).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- saving, loading, merging

def test_saved_adapter_is_one_plain_lora_of_the_original_base(dirs, tmp_path, float64_rmsnorm):
    """The saved adapter (r 3 + 4, every layer at rank 7) on the original base gives the chained
    model's logits: in peft, in a plain model of ours (load_adapter), in float64 and in float32;
    merge_lora_ of the chained model gives them too."""
    import peft
    for dtype in (torch.float64, torch.float32):
        ours = chained(dirs["base"], dirs["sft"], dtype)
        out = tmp_path / str(dtype)
        lora.save_adapter(ours, CFG, out)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == STACKED_R and config["lora_alpha"] == pytest.approx(5 / 3 * STACKED_R)
        with safe_open(out / "adapter_model.safetensors", "pt") as f:
            assert f.metadata()[chain.INIT_KEY] == "3"
            o_A = f.get_tensor("base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight")
            assert o_A.shape == (STACKED_R, 64) and o_A[3:].eq(0).all()  # no init adapter there: zero rows
        with torch.no_grad():
            expected = ours(IDS)
            theirs = peft.PeftModel.from_pretrained(hf_base(dirs, dtype), out).to(dtype).eval()
            plain = load_model(dirs["base"])
            lora.inject_lora(plain, lora.read_adapter_config(out))
            lora.load_adapter(plain.to(dtype).eval(), out)  # into float64 A, B in the float64 case
            found = [theirs(input_ids=IDS).logits, plain(IDS)]
        for logits in found:
            if dtype == torch.float64:
                assert rel(logits, expected) < TIGHT
            else:  # each a correct float32 forward of the same weights (conftest.fp32_logits_bound)
                assert_logits_match(logits, expected, n_layers=2, what="stacked adapter vs chained model")
    lora.merge_lora_(ours)  # float32, merged in float32 and rounded once: float32 rounding again
    assert_logits_match(ours(IDS), expected, n_layers=2, what="merged vs chained")


def test_resume_splits_the_adapter_back_exactly(dirs, tmp_path):
    """--resume: the saved checkpoint into a fresh model with the same init adapter gives back A and B
    bit for bit; with another init adapter, none, or a checkpoint saved without one, one line."""
    ours = chained(dirs["base"], dirs["sft"])
    lora.save_adapter(ours, CFG, tmp_path / "ckpt")
    fresh = load_model(dirs["base"])
    lora.inject_lora(fresh, CFG)
    lora.attach_init_adapter(fresh, dirs["sft"])
    lora.load_adapter(fresh, tmp_path / "ckpt")
    resumed = lora.lora_modules(fresh)
    for name, m in lora.lora_modules(ours).items():
        for ab in ("lora_A", "lora_B"):
            assert torch.equal(getattr(resumed[name], ab).weight, getattr(m, ab).weight), (name, ab)
    refused = [(dirs["sft-other"], tmp_path / "ckpt", "another --init-adapter"),  # same shapes, other values
               (None, tmp_path / "ckpt", "attach that init adapter first"),
               (dirs["sft"], dirs["dpo"], "saved with no init adapter")]  # a plain rank-3 adapter
    for init, path, message in refused:
        other = load_model(dirs["base"])
        lora.inject_lora(other, CFG)
        if init:
            lora.attach_init_adapter(other, init)
        with pytest.raises(lora.LoRAError, match=message) as e:
            lora.load_adapter(other, path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- NF4

def test_nf4_base_with_an_init_adapter(dirs):
    """QLoRA under an init adapter trains A and B; with them off it is the NF4 base + SFT, which is
    the model with every weight replaced by its NF4 rounding plus the SFT adapter (compute in fp32)."""
    from lora.quant import dequantize
    qmodel = chained(dirs["base"], dirs["sft"], quantize="nf4").train()
    loss_of(qmodel(IDS), IDS).backward()
    grads = [p.grad for m in lora.lora_modules(qmodel).values() for p in (m.lora_A.weight, m.lora_B.weight)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    rounded = load_model(dirs["base"])
    with torch.no_grad():
        for name, m in lora.lora_modules(qmodel).items():
            rounded.get_submodule(name).weight.copy_(dequantize(m.weight))
    lora.load_adapter(rounded, dirs["sft"])
    with torch.no_grad(), lora.adapter_disabled(qmodel):
        reference = qmodel.eval()(IDS)
    # NF4's kernel dequantizes and runs F.linear in fp32: float32 rounding at this depth apart.
    assert_logits_match(reference, rounded(IDS), n_layers=2, what="NF4 + init adapter vs NF4-rounded + SFT")


# ----------------------------------------------------------------------------- refusals

def rewritten(src, dst, edit):
    """A copy of the adapter in `src` whose tensors `edit` changed (a dict, in place)."""
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    with safe_open(src / "adapter_model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("case, message", [
    ("dora adapter", "DoRA adapter"),
    ("dora layers", "are DoRA"),
    ("not targeted", "v_proj.*include them in --lora-targets"),
    ("no such module", "layers.9.self_attn.q_proj, which it lacks"),
    ("shape", r"q_proj: A \(4, 32\)"),
    ("stray key", "unexpected keys"),
    ("attached twice", "already has an init adapter"),
    ("pissa", "already has an init adapter or a PiSSA start"),
])
def test_refusals_are_one_line_naming_the_adapter(dirs, tmp_path, case, message):
    sft = dirs["sft"]
    model = load_model(dirs["base"])
    lora.inject_lora(model, lora.LoRAConfig(r=3, targets=["q_proj"] if case == "not targeted" else "all-linear",
                                            dora=case == "dora layers"))
    if case == "dora adapter":
        sft = rewritten(sft, tmp_path / "a", lambda t: None)
        config = json.loads((sft / "adapter_config.json").read_text())
        (sft / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    elif case == "no such module":
        sft = rewritten(sft, tmp_path / "a", lambda t: t.update(
            {k.replace("layers.0", "layers.9"): t.pop(k) for k in [k for k in t if "layers.0.self_attn.q" in k]}))
    elif case == "shape":
        sft = rewritten(sft, tmp_path / "a", lambda t: t.update({Q_A: t[Q_A][:, :32].contiguous()}))
    elif case == "stray key":
        sft = rewritten(sft, tmp_path / "a", lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(1)}))
    elif case == "attached twice":
        lora.attach_init_adapter(model, sft)
    elif case == "pissa":  # on one layer the adapter adapts: enough to be refused
        lora.pissa_init_({Q: lora.lora_modules(model)[Q]})
    with pytest.raises(lora.LoRAError, match=message) as e:
        lora.attach_init_adapter(model, sft)
    assert str(sft) in str(e.value) and "\n" not in str(e.value)


def test_pissa_and_an_init_adapter_are_not_saved_together(dirs, tmp_path):
    model = chained(dirs["base"], dirs["sft"])
    lora.pissa_init_({Q: lora.lora_modules(model)[Q]})
    with pytest.raises(lora.LoRAError, match="PiSSA and some carry an init adapter"):
        lora.save_adapter(model, CFG, tmp_path / "out")
