"""The Llama network gives transformers' logits, and loading is strict.

Tiny random checkpoints are saved by transformers itself (norms and biases randomised, so a
dropped term shows); our `load_model` must reproduce its logits in fp32 up to float32 rounding at
that depth (`conftest.fp32_logits_bound`), and the bound is shown to catch a swapped head, a
dropped bias and a wrong RoPE.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_logits_match, break_model, fp32_logits_bound, rel, save_tiny_hf
from model import ConfigError, KVCache, LoadError, load_model
from model.fused import RMSNormFunction, RoPE, textbook_path
from model.llama import rms_norm, rope_rotate

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CASES = {
    "llama3-rope-gqa": dict(arch="llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "llama-mha": dict(arch="llama", num_key_value_heads=4),
    "llama-head-dim": dict(arch="llama", head_dim=32),
    "llama-attention-bias": dict(arch="llama", attention_bias=True),
    "llama-linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": dict(arch="mistral"),
    "qwen2-bias": dict(arch="qwen2"),
    "sharded": dict(arch="llama", shard_size="20KB"),
}


def hf_logits(path, ids, **kw):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(ids, **kw.get("call", {})).logits


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(tmp_path, name):
    path = save_tiny_hf(tmp_path / name, **CASES[name])
    if name == "sharded":
        assert (path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = load_model(path)(ids)
    assert_logits_match(ours, hf_logits(path, ids), n_layers=2, what=name)


@pytest.mark.parametrize("bug", ["swapped heads", "dropped bias", "wrong rope", "doubled norm eps"])
def test_logits_bound_catches_real_bugs(tmp_path, bug):
    """The bound above is not so loose that a real bug passes: each one breaks it many times over
    (the subtlest, a doubled RMSNorm epsilon, by about 50 times)."""
    path = save_tiny_hf(tmp_path / "qwen2", arch="qwen2")
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        broken = break_model(load_model(path), bug)(ids)
    moved = rel(broken, hf_logits(path, ids))
    print(f"{bug}: max |Δ| / max |ref| = {moved:.2e}")
    assert moved > 10 * fp32_logits_bound(2)


def test_rope_and_rms_norm_gradients_are_autograds():
    """The hand-written backwards of RoPE and RMSNorm (model/fused.py): float64 gradcheck, and the
    same values and gradients as autograd through their textbook twins (model/llama.py: rope_rotate,
    rms_norm) in float64, float32 and bf16. cos and sin get different halves, so a mixed up half in
    the rotation shows (Llama's halves are equal)."""
    g = torch.Generator().manual_seed(0)
    angles = torch.randn(2, 1, 5, 8, generator=g, dtype=torch.float64)  # (B, 1, T, head_dim)
    x = torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64).transpose(1, 2)  # (B, H, T, D) view
    x.requires_grad_()
    assert torch.autograd.gradcheck(RoPE.apply, (x, angles.cos(), angles.sin()))
    weight = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(RMSNormFunction.apply, (x, weight, 1e-5))
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        xd = x.detach().to(dtype).requires_grad_()
        wd = weight.detach().to(dtype).requires_grad_()
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        ulp = torch.finfo(dtype).eps
        for ours, plain, args, inputs in [(RoPE.apply, rope_rotate, (xd, cos, sin), [xd]),
                                          (RMSNormFunction.apply, rms_norm, (xd, wd, 1e-5), [xd, wd])]:
            y, y_ref = ours(*args), plain(*args)
            torch.testing.assert_close(y, y_ref, rtol=2 * ulp, atol=2 * ulp)
            cotangent = torch.randn(y.shape, generator=g).to(dtype)
            grads = torch.autograd.grad(y, inputs, cotangent)
            grads_ref = torch.autograd.grad(y_ref, inputs, cotangent)
            for a, b in zip(grads, grads_ref):
                torch.testing.assert_close(a, b, rtol=4 * ulp, atol=4 * ulp * b.abs().max().item())


def test_document_ids_match_separate_sequences(tiny_llama_dir):
    """Packed row with a block-diagonal mask and restarting positions = the sequences run alone."""
    model = load_model(tiny_llama_dir)
    a, b = torch.randint(0, 128, (1, 9)), torch.randint(0, 128, (1, 7))
    packed = torch.cat([a, b], dim=1)
    docs = torch.tensor([[0] * 9 + [1] * 7])
    pos = torch.cat([torch.arange(9), torch.arange(7)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=pos, document_ids=docs)
        assert_logits_match(out[:, :9], model(a), n_layers=2, what="packed, first document")
        assert_logits_match(out[:, 9:], model(b), n_layers=2, what="packed, second document")


def varlen_by_documents(q, k, v, cu_q, cu_k, max_q, max_k, window_size, enable_gqa):
    """What torch's varlen_attn computes, written per document with SDPA and an explicit mask: q
    (tokens, H, D), k, v (tokens, Hkv, D); document i is tokens cu[i]..cu[i+1]; each query sees the
    keys of its own document at or before it, at most window_size[0] before it (-1: all)."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and window_size[1] == 0
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    assert enable_gqa == (k.shape[1] != q.shape[1])
    outs = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None, :]
        allowed = (j <= i) & ((j >= i - window_size[0]) if window_size[0] >= 0 else True)
        qd, kd, vd = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (heads, n, D)
        kd, vd = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=0) for t in (kd, vd))
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=allowed).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("overrides", [{}, {"arch": "mistral", "sliding_window": 6}, {"num_key_value_heads": 4}])
def test_packed_rows_through_varlen_attention_equal_the_mask(tmp_path, monkeypatch, overrides):
    """On CUDA in bf16/fp16, packed rows go to FlashAttention's variable-length kernel instead of
    SDPA with a block-diagonal mask. The kernel is CUDA-only; here torch's varlen_attn (llama.varlen_kernel) is replaced
    by its definition, written per document (varlen_by_documents), so that what this test proves
    is the rest: the documents' bounds (packed_documents), the flattening of (B, H, T, D) to
    tokens and back, GQA and the sliding window, in float64, loss and every gradient equal to the
    mask path's. test_packed_kernels_on_cuda checks the kernel itself where there is one."""
    import data
    import model.llama as llama
    from model.loss import lm_loss_sum
    path = save_tiny_hf(tmp_path / "m", **{"arch": "llama", **overrides})
    model = load_model(path, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    rows = [[{"input_ids": ids, "labels": ids} for ids in (torch.randint(0, 128, (n,), generator=g).tolist()
             for n in lengths)] for lengths in ((9, 7, 4), (13,), (3, 5))]  # a full row; two padded
    batch = data.collate(rows, pad_id=0, pack=True)
    documents = llama.packed_documents(batch["document_ids"])
    T = batch["input_ids"].shape[1]
    assert documents.cu_seqlens.tolist() == [0, 9, 16, T, T + 13, 2 * T, 2 * T + 3, 2 * T + 8, 3 * T]  # pads: one each
    assert T == 20 and documents.max_len == 13

    def loss_and_grads(varlen):
        calls = []
        monkeypatch.setattr(llama, "varlen_runs", lambda x, config: varlen)
        monkeypatch.setattr(llama, "varlen_kernel", lambda: lambda *a, **kw: calls.append(1) or varlen_by_documents(*a, **kw))
        loss, _ = lm_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"],
                              batch["document_ids"], documents=documents if varlen else None)
        assert len(calls) == (model.config.num_hidden_layers if varlen else 0)
        return [loss, *torch.autograd.grad(loss, [p for p in model.parameters()])]

    for a, b in zip(loss_and_grads(True), loss_and_grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # float64: the same sums, reordered


def test_varlen_runs_only_where_the_kernel_is():
    import model.llama as llama
    from model.config import LlamaConfig
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    for dtype in (torch.float32, torch.bfloat16):
        assert not llama.varlen_runs(torch.zeros(1, dtype=dtype), config)  # the CPU keeps the mask


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the packed kernels' choice is CUDA's")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_kernels_on_cuda(tiny_llama_dir, monkeypatch, dtype):
    """The real kernels: packed rows' loss through varlen attention (where it runs) and one SDPA
    call per document against the mask path, on the GPU. Bound: bf16 rounding (8 bits) over two
    layers, as bench/gpu_check.py's; in fp32 1e-3, as SDPA's fp32 kernels may multiply in TF32 (10
    bits) on Ampere and later. Attending across documents moves the loss far more."""
    import data
    import model.llama as llama
    from model.loss import lm_loss_sum
    model = load_model(tiny_llama_dir, dtype=dtype, device="cuda")
    rows = [[{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]
            for lengths in ((30, 17), (40,))]
    batch = {k: v.cuda() for k, v in data.collate(rows, pad_id=0, pack=True).items()}
    assert llama.packed_kernel(model.model.embed_tokens.weight, model.config) != "mask"
    kernels = ["documents"] + (["varlen"] if llama.varlen_runs(batch["input_ids"].new_zeros(1, dtype=dtype),
                                                              model.config) else [])

    def loss(kernel):
        monkeypatch.setattr(llama, "packed_kernel", lambda x, config: kernel)
        return lm_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"],
                           batch["document_ids"])[0].item()

    bound = 3e-2 if dtype == torch.bfloat16 else 1e-3
    mask = loss("mask")
    for kernel in kernels:
        ours = loss(kernel)
        assert abs(ours - mask) <= bound * abs(mask), (kernel, ours, mask)


@pytest.mark.parametrize("overrides", [{}, {"arch": "qwen2", "tie_word_embeddings": True},
                                       {"arch": "mistral", "sliding_window": 6}])
def test_textbook_path_equals_the_fast_one(tmp_path, overrides):
    """The whole model with LoRA on every projection, through the fast pieces and through their
    textbook twins (model.fused.textbook_path: RMSNorm, RoPE, attention written out, q/k/v and
    gate/up one by one, LoRA's formula, the loss over full logits): the same loss and the same
    gradient of every LoRA weight, in float64, on unpacked and packed rows (the mask path, and a
    KV-cached decode). float64: the same sums, in other orders."""
    import data
    import lora
    from model.loss import lm_loss_sum
    path = save_tiny_hf(tmp_path / "m", **{"arch": "llama", **overrides})
    model = load_model(path, dtype=torch.float64)
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.25, targets="all-linear"))
    model.double().train()
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    rows = [[{"input_ids": ids, "labels": ids} for ids in (torch.randint(0, 128, (n,), generator=g).tolist()
             for n in lengths)] for lengths in ((9, 7), (12,))]
    unpacked = data.collate([e for row in rows for e in row], pad_id=0)
    packed = data.collate(rows, pad_id=0, pack=True)

    def loss_and_grads(batch):
        torch.manual_seed(3)  # the same dropout masks on both paths
        loss, n = lm_loss_sum(model, batch["input_ids"], batch["labels"], batch.get("position_ids"),
                              batch.get("document_ids"))
        return [loss, torch.tensor(float(n)), *torch.autograd.grad(loss, params)]

    for batch in (unpacked, packed):
        fast = loss_and_grads(batch)
        with textbook_path():
            textbook = loss_and_grads(batch)
        for a, b in zip(fast, textbook, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    model.eval()
    with torch.no_grad():
        ids = unpacked["input_ids"][:1, :9]
        outs = []
        for reference in (False, True):
            with textbook_path(reference):
                cache = KVCache(model.config, 1, 16, torch.float64, "cpu")
                outs.append(torch.cat([model(ids[:, :5], kv_cache=cache)] +
                                      [model(ids[:, t:t + 1], kv_cache=cache) for t in range(5, 9)], dim=1))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)


def test_textbook_path_switch_is_scoped():
    """textbook_path() turns the twins on for its block and restores the previous choice, also on
    an exception and when blocks nest."""
    from model import fused
    assert fused.enabled()
    with pytest.raises(ZeroDivisionError):
        with textbook_path():
            assert not fused.enabled()
            1 / 0
    assert fused.enabled()
    with textbook_path():
        assert not fused.enabled()
        with textbook_path(False):
            assert fused.enabled()
        assert not fused.enabled()
    assert fused.enabled()


def test_kv_cache_equals_full_recompute(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 16, torch.float32, "cpu")
        steps = [model(ids[:, :5], kv_cache=cache)]  # prefill 5, then 3, then one at a time
        steps.append(model(ids[:, 5:8], kv_cache=cache))
        steps += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(8, 12)]
    assert_logits_match(torch.cat(steps, dim=1), full, n_layers=2, what="KV cache")


def test_sliding_window_matches_transformers(tmp_path):
    path = save_tiny_hf(tmp_path / "mistral-window", arch="mistral", sliding_window=16)
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        ours = load_model(path)(ids)
    assert_logits_match(ours, hf_logits(path, ids), n_layers=2, what="sliding window")


def test_bf16_load_keeps_rope_in_fp32(tiny_llama_dir):
    model = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.rope_inv_freq.dtype == torch.float32
    assert model(torch.randint(0, 128, (1, 8))).dtype == torch.bfloat16


def test_tied_embeddings_share_storage(tmp_path):
    model = load_model(save_tiny_hf(tmp_path / "tied", tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# --- strict loading ---------------------------------------------------------------------------

def _rewrite(path, drop=None, add=None, reshape=None):
    from safetensors.torch import load_file, save_file
    f = path / "model.safetensors"
    sd = load_file(f)
    if drop:
        del sd[drop]
    if add:
        sd[add] = torch.zeros(3)
    if reshape:
        sd[reshape] = sd[reshape][:-1].contiguous()
    save_file(sd, f, metadata={"format": "pt"})


@pytest.mark.parametrize("change, message", [
    (dict(drop="model.layers.1.mlp.up_proj.weight"), "missing keys: model.layers.1.mlp.up_proj.weight"),
    (dict(add="model.layers.0.extra.weight"), "unexpected keys: model.layers.0.extra.weight"),
    (dict(reshape="model.layers.0.self_attn.k_proj.weight"), "model.layers.0.self_attn.k_proj.weight: shape"),
])
def test_strict_loading_errors(tiny_llama_dir, change, message):
    _rewrite(tiny_llama_dir, **change)
    with pytest.raises(LoadError, match=message.replace("(", r"\(")):
        load_model(tiny_llama_dir)


def test_pickle_only_directory_is_refused(tiny_llama_dir):
    (tiny_llama_dir / "model.safetensors").rename(tiny_llama_dir / "pytorch_model.bin")
    with pytest.raises(LoadError, match="only pickle checkpoints .*pytorch_model.bin.*safetensors only"):
        load_model(tiny_llama_dir)


def test_unknown_architecture_is_named(tiny_llama_dir):
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (tiny_llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'GPTNeoXForCausalLM' is not supported"):
        load_model(tiny_llama_dir)


def test_missing_directory_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(LoadError, match="no such directory"):
        load_model(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match="some-org/some-model: not a local directory, and the hub download failed"):
        load_model("some-org/some-model")
