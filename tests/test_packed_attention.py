"""Packed rows keep their documents apart without a mask, and compute what the mask path computes.

On CUDA, where FlashAttention's varlen kernel does not run (an older torch, fp32), packed rows take
one SDPA call per document (model.llama.document_attention) instead of SDPA with the (B, 1, T, T)
block-diagonal mask, whose math kernel holds all B*H*T^2 scores. Here, on the CPU, in float64:
packed_documents finds each document's (row, start, end); document_attention equals SDPA with the
model's own mask forward and backward (GQA and MHA, several documents a row, a padding document,
two rows, a sliding window shorter than some documents); the whole model gives the same logits,
loss and gradients through either path; and torch.compile does not recompile its blocks for every
new number of documents.
"""

import pytest
import torch
import torch.nn.functional as F

import data
import model.llama as llama
from conftest import save_tiny_hf
from model import load_model
from model.config import LlamaConfig
from model.loss import lm_loss_sum

# float64 through two kernels that add the same terms in other orders (SDPA's blocks depend on the
# sequence it is given: a document, or the whole row): a few roundings of 2^-52, far below 1e-10.
TIGHT = dict(rtol=1e-10, atol=1e-12)


def packed_rows(lengths_per_row, seed=0):
    """data.collate's packed micro-batch of random examples, one list of lengths per row."""
    g = torch.Generator().manual_seed(seed)
    rows = [[{"input_ids": ids, "labels": ids} for ids in (torch.randint(0, 128, (n,), generator=g).tolist()
             for n in lengths)] for lengths in lengths_per_row]
    return data.collate(rows, pad_id=0, pack=True)


def test_spans_are_the_runs_of_document_ids():
    """Each span is a maximal run of one id in its row; the spans cover every row in order, the
    padding being one more; cu_seqlens are the same bounds, flattened; .to() leaves spans on the CPU."""
    document_ids = packed_rows([(9, 7, 4), (13,), (3, 5)])["document_ids"]  # T = 20: a full row, two padded
    documents = llama.packed_documents(document_ids)
    assert documents.spans.tolist() == [[0, 0, 9], [0, 9, 16], [0, 16, 20],
                                        [1, 0, 13], [1, 13, 20],  # the padding of row 1 is a document
                                        [2, 0, 3], [2, 3, 8], [2, 8, 20]]
    T = document_ids.shape[1]
    for b, s, e in documents.spans.tolist():
        run = document_ids[b, s:e]
        assert (run == run[0]).all()  # one document...
        assert s == 0 or document_ids[b, s - 1] != run[0]  # ...all of it
        assert e == T or document_ids[b, e] != run[0]
    assert documents.cu_seqlens.tolist() == [b * T + s for b, s, _ in documents.spans.tolist()] + [3 * T]
    assert documents.max_len == 13 and documents.kernel == "documents"
    moved = documents._replace(kernel="varlen").to("meta")
    assert moved.cu_seqlens.device.type == "meta" and moved.spans.device.type == "cpu"
    assert moved.kernel == "varlen"


@pytest.mark.parametrize("sdpa_gqa", [True, False], ids=["enable_gqa", "repeated-kv"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_document_attention_equals_the_mask(monkeypatch, n_kv_heads, window, sdpa_gqa):
    """document_attention against SDPA with Llama.attention_mask's block-diagonal mask (what
    Attention.forward runs with it, and the textbook attention()), in float64: the output and the
    gradients of q, k and v. Two rows, documents of 9, 7, 4 and 3, 5 tokens and a padding
    document of 12; with a window of 4, most documents are longer than it. Also with K/V heads
    repeated, as where SDPA has no enable_gqa."""
    monkeypatch.setattr(llama, "_SDPA_HAS_GQA", sdpa_gqa and llama._SDPA_HAS_GQA)
    document_ids = packed_rows([(9, 7, 4), (3, 5)])["document_ids"]  # (2, 20)
    B, T, H, D = *document_ids.shape, 4, 16
    config = LlamaConfig(vocab_size=8, hidden_size=H * D, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=H, num_key_value_heads=n_kv_heads, head_dim=D, sliding_window=window)
    mask = llama.Llama(config).attention_mask(T, 0, document_ids)  # (B, 1, T, T)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, n_kv_heads, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    cotangent = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    n_rep = H // n_kv_heads

    def by_mask(q, k, v):
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    spans = llama.packed_documents(document_ids).spans
    ours = llama.document_attention(q, k, v, spans, window)
    for twin in (by_mask(q, k, v), llama.attention(q, k, v, mask)):
        torch.testing.assert_close(ours, twin, **TIGHT)
        grads = torch.autograd.grad(ours, (q, k, v), cotangent, retain_graph=True)
        grads_twin = torch.autograd.grad(twin, (q, k, v), cotangent)
        for a, b in zip(grads, grads_twin, strict=True):
            torch.testing.assert_close(a, b, **TIGHT)


def test_packed_kernel_keeps_the_mask_on_the_cpu(monkeypatch):
    """The CPU's SDPA reads a mask without forming the scores: it keeps the mask path. varlen goes
    first wherever it runs."""
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    for dtype in (torch.float32, torch.bfloat16):
        assert llama.packed_kernel(torch.zeros(1, dtype=dtype), config) == "mask"
    monkeypatch.setattr(llama, "varlen_runs", lambda x, config: True)
    assert llama.packed_kernel(torch.zeros(1), config) == "varlen"


@pytest.mark.parametrize("overrides", [{}, {"arch": "mistral", "sliding_window": 6}, {"num_key_value_heads": 4}])
def test_model_through_document_attention_equals_the_mask(tmp_path, monkeypatch, overrides):
    """The whole 2-layer model on packed rows with packed_kernel forced to "documents" (as on a GPU
    without varlen) and to "mask" (as on the CPU), in float64: the same logits, the same loss and
    the same gradient of every parameter; also with gradient checkpointing, whose recomputation
    re-reads the documents. The per-document path is taken in every layer, the mask never built."""
    path = save_tiny_hf(tmp_path / "m", **{"arch": "llama", **overrides})
    # the same weights (the file's) either way; checkpointing only recomputes in training, and the
    # tiny model has no dropout
    models = {c: load_model(path, dtype=torch.float64, grad_checkpointing=c).train() for c in (False, True)}
    batch = packed_rows([(9, 7, 4), (13,), (3, 5)])  # a full row, two padded
    calls = []
    document_attention = llama.document_attention
    monkeypatch.setattr(llama, "document_attention", lambda *a: calls.append(1) or document_attention(*a))

    def run(kernel, checkpointing=False):
        monkeypatch.setattr(llama, "packed_kernel", lambda x, config: kernel)
        model = models[checkpointing]
        calls.clear()
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["position_ids"], batch["document_ids"])
        loss, _ = lm_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"],
                              batch["document_ids"])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        layers = model.config.num_hidden_layers
        assert len(calls) == (0 if kernel == "mask" else (3 if checkpointing else 2) * layers)
        return [logits, loss, *grads]

    mask = run("mask")
    for kernel, checkpointing in [("documents", False), ("documents", True)]:
        for a, b in zip(run(kernel, checkpointing), mask, strict=True):
            torch.testing.assert_close(a, b, **TIGHT)


def test_compiled_blocks_compile_a_bounded_number_of_times_as_document_counts_vary(monkeypatch):
    """--compile compiles each decoder block. document_attention is left out of the graph and spans
    are a tensor, so that a new number of documents in a micro-batch is a new size, which turns
    dynamic, not a new tuple to guard on (a recompile for each count, and eager after 8)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(llama, "packed_kernel", lambda x, config: "documents")
    torch.manual_seed(0)
    model = llama.Llama(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    torch._dynamo.reset()
    counters.clear()
    for layer in model.model.layers:
        layer.compile(backend="eager")  # the guards are dynamo's; no code generation needed

    def step(n_documents):
        batch = packed_rows([[24 // n_documents] * n_documents], seed=n_documents)
        model(batch["input_ids"], batch["position_ids"], batch["document_ids"]).sum().backward()
        return counters["stats"]["unique_graphs"]

    try:
        for n in (2, 3, 4):
            compiled = step(n)
        assert [step(n) for n in (6, 8, 12, 24)] == [compiled] * 4  # nothing more compiled
    finally:
        torch._dynamo.reset()
