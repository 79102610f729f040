"""The chunked loss (only trained positions reach lm_head, a chunk of logits at a time) equals the
plain cross entropy over full logits, in value and in gradient."""

import torch
import torch.nn.functional as F

import model.fused as fused
import model.loss as loss_module
from model import load_model


def plain_loss(model, ids, labels):
    logits = model(ids).float()  # (B, T, vocab), all of it
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")


def test_chunked_loss_equals_plain(tiny_llama_dir, monkeypatch):
    model = load_model(tiny_llama_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    ids = torch.randint(0, 128, (3, 40))
    labels = ids.clone()
    labels[:, :7] = -100  # a masked prompt
    labels[2, 30:] = -100  # padding
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 128 * 16)  # chunks of 16 rows: 6 chunks here
    ours, n = loss_module.lm_loss_sum(model, ids, labels)
    (grad_ours,) = torch.autograd.grad(ours, model.model.layers[0].mlp.up_proj.weight)
    ref = plain_loss(model, ids, labels)
    (grad_ref,) = torch.autograd.grad(ref, model.model.layers[0].mlp.up_proj.weight)
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(ours, ref, rtol=1e-6)
    assert torch.allclose(grad_ours, grad_ref, rtol=1e-5, atol=1e-7)


def test_linear_cross_entropy_gradients_float64():
    """The hand-formed gradients (softmax - onehot, times W or h) against autograd, in float64,
    over several chunks, for hidden states and for a trainable lm_head weight."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    ours = fused.LinearCrossEntropy.apply(hidden, weight, targets, 8)  # 5 chunks
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert ours.dtype == torch.float64  # accumulated in fp32 or wider, like the logits of a chunk
    assert torch.allclose(ours, ref, rtol=1e-12)
    scale = torch.tensor(0.37)  # what backward receives after loss / n, gradient accumulation...
    ours_grads = torch.autograd.grad(ours * scale, (hidden, weight))
    ref_grads = torch.autograd.grad(ref * scale.double(), (hidden, weight))
    for a, b in zip(ours_grads, ref_grads):
        # float64 logits inside: agreement to float64 rounding
        assert a.dtype == torch.float64 and torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_without_grad_and_with_a_frozen_weight():
    hidden, weight = torch.randn(6, 8), torch.randn(10, 8)
    targets = torch.randint(0, 10, (6,))
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    with torch.no_grad():  # evaluation: the loss alone, nothing kept for backward
        loss = fused.LinearCrossEntropy.apply(hidden, weight, targets, 4)
    assert loss.grad_fn is None and torch.allclose(loss, ref)
    hidden.requires_grad_(True)  # the usual case: lm_head frozen, only the hidden states need a gradient
    (grad,) = torch.autograd.grad(fused.LinearCrossEntropy.apply(hidden, weight, targets, 4), hidden)
    (grad_ref,) = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, targets, reduction="sum"), hidden)
    assert torch.allclose(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_under_bf16_autocast_matches_autograd():
    """In mixed precision the gradient matmuls see bf16 operands, as autograd's would."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(24, 32, generator=g, requires_grad=True)
    weight = torch.randn(64, 32, generator=g)
    targets = torch.randint(0, 64, (24,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused.LinearCrossEntropy.apply(hidden, weight, targets, 10)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    (grad_ours,) = torch.autograd.grad(ours, hidden)
    (grad_ref,) = torch.autograd.grad(ref, hidden)
    assert torch.allclose(ours, ref, rtol=1e-5)
    assert torch.allclose(grad_ours, grad_ref, rtol=2e-2, atol=2e-2)
