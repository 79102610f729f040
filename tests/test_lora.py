"""LoRA by hand, checked against the maths and against peft.

Proves: LoRALinear's gradients are right (float64 gradcheck); layers that share an input give
the outputs and gradients of the textbook formula, through the written-out backward (LoRAGroup)
and through the op-by-op fallback, with and without dropout; a fresh layer (B = 0) computes its
base layer exactly; an optimizer step moves A and B and nothing else; forward and gradients equal
peft's LoRA with the same A and B (plain and rsLoRA; Llama with GQA, Qwen2 with biases, tied
embeddings); mixed dtypes (bf16 base, fp32 A and B, autocast) behave; QLoRA (NF4) runs forward and
backward on the CPU, trains only A and B and equals the model with NF4-rounded weights; adapters
move between nanolora and peft in both directions; bad targets and adapters fail with one line.
"""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from safetensors import safe_open

import lora
from conftest import assert_logits_match, rel, save_tiny_hf
from model.load import load_model

ALL = lora.LLAMA_LINEARS


def randomize_lora(model, seed=0, std=0.05):
    """Give every B (and A) random values, so the LoRA path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            for w in (m.lora_A.weight, m.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * std)


def loss_of(logits, ids):
    """Next-token cross-entropy: the loss shifts by one."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def frobenius_rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- the layer

def test_gradcheck_float64():
    layer = lora.LoRALinear(nn.Linear(6, 5, dtype=torch.float64), r=3, alpha=6).double()
    nn.init.normal_(layer.lora_B.weight)  # B = 0 would make A's gradient vanish
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    A = layer.lora_A.weight.detach().clone().requires_grad_()
    B = layer.lora_B.weight.detach().clone().requires_grad_()
    f = lambda x, A, B: torch.func.functional_call(layer, {"lora_A.weight": A, "lora_B.weight": B}, (x,))
    assert torch.autograd.gradcheck(f, (x, A, B))


def test_fresh_layer_equals_base_exactly():
    base = nn.Linear(64, 32)
    layer = lora.LoRALinear(base, r=8, alpha=16, dropout=0.1).eval()
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), base(x))
    assert layer.weight is base.weight and layer.bias is base.bias  # same Parameters, not copies
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.abs().max() <= 1 / 64 ** 0.5  # kaiming-uniform(a=sqrt(5)) bound
    assert not layer.lora_A.weight.eq(0).all() and layer.lora_B.weight.eq(0).all()
    assert lora.LoRALinear(base, r=4, alpha=8, rslora=True).scaling == 8 / 2
    assert isinstance(lora.LoRALinear(base, 4, 8, dropout=0.0).lora_dropout, nn.Identity)


def test_step_moves_only_A_and_B(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    names = lora.inject_lora(model, lora.LoRAConfig(r=4, targets="all-linear"))
    assert len(names) == 14 and "lm_head" not in names
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 28  # A and B of 14 layers, nothing else
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(2):  # step 1 moves B (A's gradient is B^T... = 0 while B = 0), step 2 moves A
        opt.zero_grad()
        loss_of(model(IDS), IDS).backward()
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) != (".lora_" in k), k
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


@pytest.mark.parametrize("precision", ["float64", "float32", "bf16-autocast"])
def test_gradient_checkpointing_recomputes_the_same_dropout_masks(tiny_llama_dir, precision):
    """With LoRA dropout, recomputing each block in backward (grad_checkpointing) draws the same masks
    again (the RNG state is restored), so the gradients equal those of the run that kept its
    activations; the masks do matter (eval mode gives other gradients). A and B in float64 with the
    float64 base take LoRAGroup's path; float32 A and B on it, the op-by-op one; a bf16 base under
    autocast, LoRAGroup's path in bf16 (the recomputation runs under autocast too)."""
    dtype = {"float64": torch.float64, "float32": torch.float64, "bf16-autocast": torch.bfloat16}[precision]
    lora_dtype = torch.float64 if precision == "float64" else torch.float32

    def build(checkpointing):  # the same weights either way: the file's, and randomize_lora's seed
        model = load_model(tiny_llama_dir, dtype=dtype, grad_checkpointing=checkpointing)
        lora.inject_lora(model, lora.LoRAConfig(r=4, dropout=0.3, targets="all-linear"))
        if precision == "float64":
            model.double()  # A and B too: one dtype throughout, so LoRAGroup runs
        assert {m.lora_A.weight.dtype for m in lora.lora_modules(model).values()} == {lora_dtype}
        randomize_lora(model)
        return model, [p for p in model.parameters() if p.requires_grad]

    models = {checkpointing: build(checkpointing) for checkpointing in (False, True)}

    def grads(checkpointing, train=True):
        model, params = models[checkpointing]
        model.train(train)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            loss = loss_of(model(IDS).float(), IDS)
        return torch.autograd.grad(loss, params)

    kept = grads(False)
    for a, b in zip(grads(True), kept, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not all(torch.allclose(a, b) for a, b in zip(grads(False, train=False), kept))


def textbook(m, x):
    """base(x) + scaling * B A dropout(x), with nn modules and autograd: the reference for LoRALinear."""
    return m.base_forward(x) + m.scaling * m.lora_B(m.lora_A(m.lora_dropout(x)))


def group_of_three(dropout, seed=0):
    """q/k/v-like LoRA layers on one 16-wide input, float64: widths and ranks differ, one has a bias."""
    torch.manual_seed(seed)
    shapes = [(16, 4, False), (8, 4, True), (8, 2, False)]  # (out, r, bias)
    layers = [lora.LoRALinear(nn.Linear(16, out, bias=bias, dtype=torch.float64), r=r, alpha=2 * r,
                              dropout=dropout).double() for out, r, bias in shapes]
    for m in layers:
        nn.init.normal_(m.lora_B.weight)
    return layers


def test_the_model_groups_its_projections_on_the_fast_path_only(tmp_path, monkeypatch):
    """A LoRA model's forward reaches lora/fused.py once per group of projections that read the same
    input (q/k/v, o, gate/up, down: through LoRALinear.forward_shared, the model's SharedInputLinear
    hook), and under textbook_path() never."""
    from lora import fused as lora_fused
    from model.fused import textbook_path
    model = load_model(save_tiny_hf(tmp_path / "m"))
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=lora.LLAMA_LINEARS))
    groups, real = [], lora_fused.lora_forward
    monkeypatch.setattr(lora_fused, "lora_forward", lambda x, layers: groups.append(len(layers)) or real(x, layers))
    fast = model(IDS)
    assert groups == [3, 1, 2, 1] * model.config.num_hidden_layers
    groups.clear()
    with textbook_path():
        textbook = model(IDS)
    assert groups == []
    torch.testing.assert_close(fast, textbook, rtol=1e-5, atol=1e-5)  # fp32: the two differ by rounding only


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("path", ["written-out", "op-by-op"])
def test_shared_input_group_matches_the_textbook_formula(dropout, path, monkeypatch):
    """forward_shared on layers that read the same x (q/k/v, gate/up) gives the outputs and the
    gradients (x, each A, each B) of base(x) + scaling * B A dropout(x) layer by layer, with the
    same masks: through LoRAGroup's written-out backward, and through the op-by-op fallback that
    bf16, autocast and NF4 take. Also with frozen A, and with x not requiring a gradient either
    (the first layer's input), which skip parts of the backward."""
    if path == "op-by-op":
        monkeypatch.setattr(lora.fused.LoRAGroup, "dtype_for", staticmethod(lambda x, layers: None))
    layers = group_of_three(dropout)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    for x_trains, A_trains in [(True, True), (True, False), (False, False)]:
        x.requires_grad_(x_trains)
        for m in layers:
            m.lora_A.weight.requires_grad_(A_trains)
        needs = [p for p in (x, *[p for m in layers for p in (m.lora_A.weight, m.lora_B.weight)])
                 if p.requires_grad]
        cotangents = [torch.randn(2, 5, m.out_features, dtype=torch.float64) for m in layers]
        torch.manual_seed(1)
        ours = lora.LoRALinear.forward_shared(x, layers)
        torch.manual_seed(1)
        reference = [textbook(m, x) for m in layers]
        if dropout:  # the masks were drawn: without dropout the output differs
            without = layers[0].eval()(x).detach()
            layers[0].train()
            assert not torch.allclose(ours[0], without)
        for a, b in zip(ours, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        grads = [torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cotangents)), needs)
                 for outs in (ours, reference)]
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lora_group_gradcheck():
    """LoRAGroup's written-out backward against finite differences (float64), in x, A and B, with
    and without dropout masks, one layer and a group."""
    for n, dropout in [(1, 0.0), (3, 0.0), (3, 0.5)]:
        layers = group_of_three(dropout, seed=n)[:n]
        x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
        keeps = [m.dropout_mask(x)[0] for m in layers]
        alphas = [m.scaling * (2 if dropout else 1) for m in layers]
        weights = [t for m in layers for t in (m.weight, m.bias, m.lora_A.weight, m.lora_B.weight)]
        f = lambda x, *w: lora.fused.LoRAGroup.apply(x, torch.float64, alphas, keeps, *w)
        assert torch.autograd.gradcheck(f, (x, *weights))


# Unit roundoff-sized steps of the autocast dtypes (machine epsilon: 2^-8 for bf16, 2^-11 for fp16).
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_under_autocast_matches_the_textbook_formula(dtype, dropout):
    """Mixed precision as train.py runs it (a bf16 or fp16 base, float32 A and B, autocast on):
    forward_shared takes LoRAGroup's written-out path, its outputs and dx come in the compute dtype
    and dA, dB in float32, and against the same formula evaluated in float64 on the same values
    (and masks) it is as accurate as the textbook formula run op by op under autocast, and within
    two epsilons of it. Why two: the inputs are exact, every matmul rounds its output once (half an
    epsilon), and each gradient passes through at most one rounded intermediate (d down = g B) before
    its own rounding; the measured errors are about one epsilon, the textbook's alike."""
    torch.manual_seed(0)
    shapes = [(96, 8, False), (32, 8, True), (32, 4, False)]  # q/k/v-like: (out, r, bias)
    layers = [lora.LoRALinear(nn.Linear(64, out, bias=bias, dtype=dtype), r=r, alpha=2 * r, dropout=dropout)
              for out, r, bias in shapes]
    for m in layers:
        nn.init.normal_(m.lora_B.weight, std=0.1)
    x = torch.randn(2, 40, 64, dtype=dtype, requires_grad=True)
    cotangents = [torch.randn(2, 40, m.out_features) for m in layers]

    def run(layers, x, forward, autocast=True):
        params = [x, *[p for m in layers for p in (m.lora_A.weight, m.lora_B.weight)]]
        torch.manual_seed(1)  # the same dropout masks in every run
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            outs = forward(layers, x)
        loss = sum((o.to(c.dtype) * c).sum() for o, c in zip(outs, cotangents))
        return [*outs, *torch.autograd.grad(loss, params)]

    ours = run(layers, x, lambda layers, x: lora.LoRALinear.forward_shared(x, layers))
    assert ours[0].grad_fn.next_functions[0][0].name() == "LoRAGroupBackward"
    assert [t.dtype for t in ours] == [dtype] * 4 + [torch.float32] * 6  # outs, dx, then dA, dB
    reference = run(layers, x, lambda layers, x: [textbook(m, x) for m in layers])
    layers64 = [copy.deepcopy(m).double() for m in layers]
    cotangents[:] = [c.double() for c in cotangents]
    exact = run(layers64, x.detach().double().requires_grad_(), lambda layers, x: [textbook(m, x) for m in layers],
                autocast=False)
    for a, b, truth in zip(ours, reference, exact, strict=True):
        err_ours, err_reference = frobenius_rel(a.double(), truth), frobenius_rel(b.double(), truth)
        assert err_ours <= 1.1 * err_reference, (err_ours, err_reference)
        assert frobenius_rel(a.double(), b.double()) <= 2 * EPS[dtype]


def test_group_dtype():
    """Where the written-out path runs: one dtype outside autocast (float32, float64); under autocast
    its dtype, for float32 or autocast-dtype tensors; not for float64 under autocast (autocast leaves
    float64 alone), nor a bf16 base with float32 A and B outside autocast (the update is formed in
    float32 there, op by op)."""
    def group(dtype, lora_dtype=torch.float32):
        return [lora.LoRALinear(nn.Linear(8, 4, dtype=dtype), r=2, alpha=4).to(lora_dtype)]
    dtype_for = lora.fused.LoRAGroup.dtype_for
    assert dtype_for(torch.zeros(3, 8), group(torch.float32)) == torch.float32
    assert dtype_for(torch.zeros(3, 8, dtype=torch.float64), group(torch.float64, torch.float64)) == torch.float64
    assert dtype_for(torch.zeros(3, 8, dtype=torch.bfloat16), group(torch.bfloat16)) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dtype_for(torch.zeros(3, 8, dtype=torch.bfloat16), group(torch.bfloat16)) == torch.bfloat16
        assert dtype_for(torch.zeros(3, 8), group(torch.float32)) == torch.bfloat16
        assert dtype_for(torch.zeros(3, 8, dtype=torch.float64), group(torch.float64, torch.float64)) is None


def test_cpu_dropout_mask():
    """LoRADropout's CPU mask: each element kept with probability 1 - p (also in each of the four
    16-bit lanes that share a 64-bit draw), kept ones scaled so that E[output] = x, the gradient
    goes through the same mask, a fresh mask each call, the same masks for the same seed."""
    dropout = lora.LoRADropout(0.05)
    x = torch.randn(1000, 1024, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    keep = y != 0
    scale = 2**16 / (2**16 - round(0.05 * 2**16))
    assert torch.equal(y[keep], x.detach()[keep] * scale)
    lanes = keep.view(-1, 4).float().mean(0)  # 256k elements per lane: std of the mean 4.4e-4
    assert (lanes - 0.95).abs().max() < 2e-3, lanes
    assert abs(y.detach().sum() - x.detach().sum()) < 5 * (0.05 * x.detach().pow(2).sum()) ** 0.5  # unbiased
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, keep * scale)
    assert not torch.equal(dropout(x) != 0, keep)
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)
    assert torch.equal(dropout.eval()(x), x)


def test_dropout_gain_folded_into_the_b_path():
    """With dropout, LoRALinear scales by 1 / P(keep) in the B matmul's alpha, not on the input: the
    output and gradients are those of base(x) + scaling * B A dropout(x), with the same mask."""
    base = nn.Linear(32, 24, dtype=torch.float64)
    layer = lora.LoRALinear(base, r=4, alpha=8, dropout=0.25).double()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    dropped = layer.lora_dropout(x)  # the same mask, scaled the usual way
    assert (dropped == 0).any() and (dropped != 0).any()
    expected = base(x) + layer.scaling * layer.lora_B(layer.lora_A(dropped))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn_like(y)
    params = [x, layer.lora_A.weight, layer.lora_B.weight]
    for a, b in zip(torch.autograd.grad(y, params, cotangent), torch.autograd.grad(expected, params, cotangent)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bf16_base_fp32_lora_dtypes():
    base = nn.Linear(16, 8, dtype=torch.bfloat16)
    layer = lora.LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer(x).dtype == torch.bfloat16  # the base's output dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.weight.grad is None


# ----------------------------------------------------------------------------- against peft

def peft_twin(model_dir, ours, targets, rslora, r=4, alpha=8):
    """peft's LoRA on the transformers model of `model_dir`, with our A and B copied in."""
    import peft
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                             use_rslora=rslora)
    twin = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():
        for name, m in lora.lora_modules(ours).items():
            theirs = twin.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(m.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(m.lora_B.weight)
    return twin


# Tolerances on (logits, gradients). In float64 the two agree to what transformers' RMSNorm allows
# (it normalises in float32 whatever the dtype). In float32 the logits agree to float32 rounding at
# this depth (`conftest.fp32_logits_bound`). In float32 both carry rounding error, and the
# gradients of layer 1's q_proj (a thousand times smaller than o_proj's, from nearly uniform
# attention in a random model) amplify it: there each implementation is ~1e-5 off float64.
TOLERANCE = {torch.float64: (1e-6, 1e-6), torch.float32: (None, 5e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch, overrides, targets, rslora", [
    ("llama", {}, ["q_proj", "v_proj", "down_proj"], False),  # GQA: k, v narrower than q
    ("llama", {}, "all-linear", True),
    ("qwen2", {}, ALL, False),  # q, k, v biases
    ("llama", {"tie_word_embeddings": True}, ALL, True),
])
def test_forward_and_grads_match_peft(tmp_path, arch, overrides, targets, rslora, dtype):
    model_dir = save_tiny_hf(tmp_path / arch, arch, **overrides)
    ours = load_model(model_dir)
    lora.inject_lora(ours, lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets, rslora=rslora))
    randomize_lora(ours)
    twin = peft_twin(model_dir, ours, targets, rslora).to(dtype)
    ours.to(dtype)
    our_logits, their_logits = ours(IDS), twin(input_ids=IDS).logits
    logits_tol, grads_tol = TOLERANCE[dtype]
    if dtype == torch.float32:
        assert_logits_match(our_logits, their_logits, n_layers=2, what="LoRA vs peft")
    else:
        assert rel(our_logits, their_logits) < logits_tol
    loss_of(our_logits, IDS).backward()
    loss_of(their_logits, IDS).backward()
    for name, m in lora.lora_modules(ours).items():
        theirs = twin.base_model.model.get_submodule(name)
        for ab in "AB":
            ours_g = getattr(m, f"lora_{ab}").weight.grad
            theirs_g = getattr(theirs, f"lora_{ab}")["default"].weight.grad
            assert ours_g.dtype == dtype and rel(ours_g, theirs_g) < grads_tol, (name, ab)


def test_our_adapter_loads_in_peft(tmp_path):
    import peft
    import transformers
    model_dir = save_tiny_hf(tmp_path / "m", "qwen2")
    ours = load_model(model_dir)
    cfg = lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj", "o_proj", "up_proj"], rslora=True)
    lora.inject_lora(ours, cfg)
    randomize_lora(ours)
    lora.save_adapter(ours, cfg, tmp_path / "adapter", str(model_dir))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert written["target_modules"] == ["o_proj", "q_proj", "up_proj"] and written["use_rslora"]
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert_logits_match(ours(IDS), theirs(input_ids=IDS).logits, n_layers=2, what="our adapter in peft")


def peft_adapter(model_dir, out_dir, targets="all-linear", **kwargs):
    """An adapter written by peft, with random B (init_lora_weights=False); returns the PeftModel."""
    import peft
    import transformers
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                             **kwargs)
    twin = peft.get_peft_model(hf, config).eval()
    twin.save_pretrained(out_dir)
    return twin


def test_peft_adapter_loads_here(tmp_path):
    model_dir = save_tiny_hf(tmp_path / "m")
    twin = peft_adapter(model_dir, tmp_path / "adapter", use_rslora=True)
    ours = load_model(model_dir)
    cfg = lora.load_adapter(ours, tmp_path / "adapter")
    assert cfg.r == 8 and cfg.rslora and cfg.scaling == 16 / 8 ** 0.5
    expected = twin(input_ids=IDS).logits
    assert_logits_match(ours(IDS), expected, n_layers=2, what="peft's adapter here")
    # Into a model that already has LoRA layers (resuming training): weights replaced in place.
    again = load_model(model_dir)
    lora.inject_lora(again, lora.LoRAConfig(r=8, alpha=16, targets="all-linear", rslora=True))
    lora.load_adapter(again, tmp_path / "adapter")
    assert_logits_match(again(IDS), expected, n_layers=2, what="peft's adapter into LoRA layers")


# ----------------------------------------------------------------------------- QLoRA

@pytest.fixture
def nf4_llama_dir(tmp_path):
    """A tiny Llama whose widths are multiples of 64, as bitsandbytes' CPU NF4 kernel needs."""
    return save_tiny_hf(tmp_path / "nf4-llama", intermediate_size=128)


def test_qlora_on_cpu(nf4_llama_dir):
    from lora.quant import dequantize
    cfg = lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    qmodel = load_model(nf4_llama_dir)
    names = [n for n, m in qmodel.named_modules() if isinstance(m, nn.Linear)]
    lora.inject_lora(qmodel, cfg, quantize="nf4", compute_dtype=torch.float32)
    randomize_lora(qmodel)
    # Every linear but lm_head is NF4, targeted or not; A and B stay float32.
    linears = {n: qmodel.get_submodule(n) for n in names}
    assert all(hasattr(m.weight, "quant_state") == (n != "lm_head") for n, m in linears.items())
    assert {m.lora_A.weight.dtype for m in lora.lora_modules(qmodel).values()} == {torch.float32}

    # The same model with each weight replaced by its NF4 rounding, unquantized: equal up to fp32.
    rounded, full = load_model(nf4_llama_dir), load_model(nf4_llama_dir)
    weight_errors = []
    with torch.no_grad():
        for name, m in linears.items():
            if name != "lm_head":
                W, W_nf4 = full.get_submodule(name).weight, dequantize(m.weight)
                rounded.get_submodule(name).weight.copy_(W_nf4)
                weight_errors.append(frobenius_rel(W_nf4, W))
    for model in (rounded, full):
        lora.inject_lora(model, cfg)
        randomize_lora(model)
    q_logits, r_logits, f_logits = qmodel(IDS), rounded(IDS), full(IDS)
    assert_logits_match(q_logits, r_logits, n_layers=2, what="NF4 kernel vs NF4-rounded fp32 weights")
    # NF4 rounds each weight to one of 16 levels of its block's absmax; the logits move by the same order.
    assert max(weight_errors) < 0.1
    assert 0 < frobenius_rel(q_logits, f_logits) < 2 * max(weight_errors)

    # Training after an evaluation (bnb's own Linear4bit would now pass no gradient through on
    # AVX512-BF16 CPUs): every A and B gets a nonzero gradient; the packed 4-bit codes do not move.
    with torch.no_grad():
        qmodel(IDS)
    packed = {n: m.weight.data.clone() for n, m in linears.items() if n != "lm_head"}
    qmodel.train()
    opt = torch.optim.AdamW([p for p in qmodel.parameters() if p.requires_grad], lr=1e-2)
    loss_of(qmodel(IDS), IDS).backward()
    opt.step()
    assert {n for n, p in qmodel.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} == {
        f"{n}.lora_{ab}.weight" for n in lora.lora_modules(qmodel) for ab in "AB"}
    assert all(torch.equal(linears[n].weight.data, w) for n, w in packed.items())


def test_qlora_bf16_compute(nf4_llama_dir):
    model = load_model(nf4_llama_dir, torch.bfloat16)
    lora.inject_lora(model, lora.LoRAConfig(r=4), quantize="nf4", compute_dtype=torch.bfloat16)
    model.train()
    logits = model(IDS)
    assert logits.dtype == torch.bfloat16
    loss_of(logits.float(), IDS).backward()
    grads = [m.lora_B.weight.grad for m in lora.lora_modules(model).values()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_quantized_while_loading_equals_quantized_after(nf4_llama_dir, dtype):
    """load_model(replace_linear=nf4_loader) quantizes each linear as its weights are read; the
    model is the one a full load quantized afterwards gives, NF4 codes and logits bit for bit. While
    it loads, no other full-precision linear exists: the peak is the NF4 model plus one layer."""
    import weakref
    from lora.quant import dequantize, nf4_loader
    replace, passed, alive_then = nf4_loader(dtype), [], []

    def watching(name, linear):  # how many full-precision linears handed over before still exist
        alive_then.append(sum(ref() is not None for n, ref in passed if n != "lm_head"))
        passed.append((name, weakref.ref(linear)))
        return replace(name, linear)
    a = load_model(nf4_llama_dir, dtype, replace_linear=watching)
    b = load_model(nf4_llama_dir, dtype)
    cfg = lora.LoRAConfig(r=4, alpha=8)
    torch.manual_seed(0)
    lora.inject_lora(a, cfg, quantize="nf4", compute_dtype=dtype)
    torch.manual_seed(0)
    lora.inject_lora(b, cfg, quantize="nf4", compute_dtype=dtype)
    assert len(passed) == 15 and alive_then == [0] * 15  # 14 quantized, lm_head kept as it is
    qa, qb = lora.lora_modules(a), lora.lora_modules(b)
    assert qa.keys() == qb.keys() and len(qa) == 14 and all(m.is_quantized for m in qa.values())
    for n in qa:  # the packed 4-bit codes, and what they dequantize to (absmaxes included)
        assert torch.equal(qa[n].weight.data, qb[n].weight.data), n
        assert torch.equal(dequantize(qa[n].weight), dequantize(qb[n].weight)), n
    assert torch.equal(a(IDS), b(IDS))


# ----------------------------------------------------------------------------- errors, table

def test_table_counts(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    total = sum(p.numel() for p in model.parameters())
    lora.inject_lora(model, lora.LoRAConfig(r=4, targets=["q_proj"]))
    n_lora = 2 * 4 * (64 + 64)  # 2 layers x r x (in + out)
    console = Console(record=True, width=120)
    console.print(lora.trainable_table(model))
    text = console.export_text()
    assert f"{n_lora:,}" in text and f"{total:,}" in text and f"{total + n_lora:,}" in text


def test_injection_errors(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    with pytest.raises(lora.LoRAError, match="c_attn"):
        lora.inject_lora(model, lora.LoRAConfig(targets=["q_proj", "c_attn"]))
    with pytest.raises(lora.LoRAError, match="only nf4"):
        lora.inject_lora(model, lora.LoRAConfig(), quantize="int8")
    with pytest.raises(lora.LoRAError, match="down_proj: NF4 on the CPU needs in_features divisible by 64"):
        lora.inject_lora(model, lora.LoRAConfig(), quantize="nf4")  # intermediate_size 96
    assert not any(hasattr(p, "quant_state") for p in model.parameters())  # nothing half-done
    lora.inject_lora(model, lora.LoRAConfig())
    with pytest.raises(lora.LoRAError, match="already has LoRA"):
        lora.inject_lora(model, lora.LoRAConfig())
    with pytest.raises(lora.LoRAError, match="rank"):
        lora.LoRAConfig(r=0)


def edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": "IA3"}, "only LORA"),
    ({"use_dora": True}, "missing keys: .*lora_magnitude_vector"),  # DoRA config, plain LoRA tensors
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"init_lora_weights": "pissa_niter_4"}, "without conversion"),  # applies to a residual base
    ({"bias": "all"}, "bias"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"target_modules": ["c_attn"]}, "c_attn"),
    ({"r": 4}, "shape"),
    ({"target_modules": ["q_proj", "k_proj"]}, "unexpected keys"),
])
def test_bad_adapters_fail_clearly(tmp_path, changes, message):
    model_dir = save_tiny_hf(tmp_path / "m")
    model = load_model(model_dir)
    cfg = lora.LoRAConfig(r=8, targets=ALL)
    lora.inject_lora(model, cfg)
    lora.save_adapter(model, cfg, tmp_path / "adapter")
    edit_config(tmp_path / "adapter", **changes)
    with pytest.raises(lora.LoRAError, match=message) as e:
        lora.load_adapter(load_model(model_dir), tmp_path / "adapter")
    assert "adapter" in str(e.value) and "\n" not in str(e.value)


def test_save_is_atomic_and_keeps_other_files(tmp_path, tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    cfg = lora.LoRAConfig(r=2)
    lora.inject_lora(model, cfg)
    out = tmp_path / "run" / "adapter"
    lora.save_adapter(model, cfg, out)
    (out / "notes.txt").write_text("kept")
    lora.save_adapter(model, cfg, out)  # again, into the existing directory
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert [p.name for p in out.parent.iterdir()] == ["adapter"]  # no temporary left behind


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_blocks_do_not_break_their_graphs_when_lengths_vary(autocast):
    """--compile compiles each decoder block; micro-batches of a real run have different lengths.
    LoRA dropout (whose CPU mask uses an in-place random_) and the causal flag of attention (a
    symbolic T > 1) used to break every block's graph once per new length (41 breaks here). Also
    under bf16 autocast, where LoRAGroup runs in bf16."""
    from torch._dynamo.utils import counters
    from model.config import LlamaConfig
    from model.llama import Llama
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.1, targets=lora.LLAMA_LINEARS))
    model.train()
    torch._dynamo.reset()
    counters.clear()
    for layer in model.model.layers:
        layer.compile(backend="eager")  # graph breaks are dynamo's; no code generation needed
    if autocast:
        model.to(torch.bfloat16)
        for m in lora.lora_modules(model).values():
            m.lora_A.float(), m.lora_B.float()
    for T in (17, 33, 50):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(torch.randint(0, 128, (2, T))).float().sum().backward()
    assert sum(counters["graph_break"].values()) == 0, list(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    torch._dynamo.reset()
