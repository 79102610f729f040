"""The chunked loss (only trained positions reach lm_head, a chunk of logits at a time) equals the
plain cross entropy over full logits, in value and in gradient."""

import torch
import torch.nn.functional as F

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
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 128 * 16)  # chunks of 16 rows: 6 chunks here
    ours, n = loss_module.lm_loss_sum(model, ids, labels)
    (grad_ours,) = torch.autograd.grad(ours, model.model.layers[0].mlp.up_proj.weight)
    ref = plain_loss(model, ids, labels)
    (grad_ref,) = torch.autograd.grad(ref, model.model.layers[0].mlp.up_proj.weight)
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(ours, ref, rtol=1e-6)
    assert torch.allclose(grad_ours, grad_ref, rtol=1e-5, atol=1e-7)
