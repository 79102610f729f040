"""--offload-activations (model/offload.py) moves what autograd saves to host memory and back, and
changes nothing it computes: in float64 the loss and every LoRA gradient equal the plain run's
exactly, with and without checkpointing, on packed rows, with --tile-mlp, with DoRA and with an
NF4 base; compiled blocks take it too; the tensors really leave (each block's saved tensors are
packed to the host and come back in backward, the next block's ahead); and a 3-step train.py run
with it (and with --tile-mlp) trains what the default run trains.
"""

import contextlib
import json

import pytest
import safetensors.torch
import torch

import lora
from conftest import save_tiny_hf
from model import load_model, offload
from model.loss import lm_loss_sum
from test_train import config
from training.loop import train

IDS = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(3))


class Count:
    """The memory estimate's observer interface (model.offload.observed), counting: what stays on
    the device, and what goes to the host."""

    def __init__(self):
        self.n_kept = self.n_offloaded = 0

    def kept(self, t):
        self.n_kept += 1

    def host(self):
        self.n_offloaded += 1
        return contextlib.nullcontext()


def loss_and_grads(path, dtype=torch.float64, quantize=None, document_ids=None, dora=False, compile=False,
                   **options):
    torch.manual_seed(0)
    model = load_model(path, dtype, **options)
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=lora.LLAMA_LINEARS, dora=dora),
                     quantize=quantize, compute_dtype=dtype)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)  # B = 0 would leave A without a gradient
    for layer in model.model.layers if compile else ():
        layer.compile()
    loss, _ = lm_loss_sum(model.train(), IDS, IDS, document_ids=document_ids)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("offload") / "m")


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("packed, tiles, dora", [(False, 1, False), (True, 1, False), (False, 3, False),
                                                 (True, 3, False), (False, 1, True)])
def test_offloading_changes_nothing_computed(tiny, monkeypatch, checkpointing, packed, tiles, dora):
    """Bit for bit in float64 (the same ops on the same values: only where the saved tensors wait
    differs); with --tile-mlp both runs tile (tiling's own equality is tests/test_tiled_mlp.py's)."""
    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's tensors are all small
    docs = torch.tensor([[0] * 20 + [1] * 13, [0] * 9 + [1] * 24]) if packed else None
    kw = dict(document_ids=docs, grad_checkpointing=checkpointing, tile_mlp=tiles, dora=dora)
    plain_loss, plain = loss_and_grads(tiny, **kw)
    count = Count()
    with offload.observed(count):
        loss, grads = loss_and_grads(tiny, offload_activations=True, **kw)
    assert count.n_offloaded >= 2  # at least each block's input went to the host (the rest: without checkpointing)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain.keys() and all(torch.equal(grads[n], plain[n]) for n in plain)


def test_compiled_blocks_offload_and_tile(tiny, monkeypatch):
    """--compile with --offload-activations and --tile-mlp: the saved tensors come back with the
    strides the compiled backward expects. float32 against the plain eager run: compiled kernels
    round in another order (the bound, 1e-5 of each gradient's scale, is what compile alone moves)."""
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    plain_loss, plain = loss_and_grads(tiny, torch.float32)
    loss, grads = loss_and_grads(tiny, torch.float32, compile=True, offload_activations=True, tile_mlp=3)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=0)
    for n in plain:
        assert (grads[n] - plain[n]).abs().max() <= 1e-5 * plain[n].abs().max(), n


def test_offloading_with_an_nf4_base(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    path = save_tiny_hf(tmp_path / "nf4", intermediate_size=128)  # widths NF4 takes on the CPU
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    plain_loss, plain = loss_and_grads(path, torch.float32, "nf4", grad_checkpointing=True)
    loss, grads = loss_and_grads(path, torch.float32, "nf4", grad_checkpointing=True, offload_activations=True)
    assert torch.equal(loss, plain_loss) and all(torch.equal(grads[n], plain[n]) for n in plain)


def test_the_next_block_comes_back_ahead(tiny, monkeypatch):
    """In backward, block i's first tensor back starts block i - 1's: when block i - 1 is needed,
    its tensors are already fetched (on CUDA: copied behind block i's backward)."""
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    order, real_fetch = [], offload.Offloader.fetch
    monkeypatch.setattr(offload.Offloader, "fetch", lambda self, h: order.append(h.block) or real_fetch(self, h))
    loss_and_grads(tiny, grad_checkpointing=True, offload_activations=True)
    assert order == [1, 0]  # block 1 when backward needs it; block 0 right after, ahead of its backward


def test_eval_and_no_grad_offload_nothing(tiny, monkeypatch):
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    model = load_model(tiny, offload_activations=True)
    assert model.train().offloader(*[torch.zeros(1)] * 4) is not None
    assert model.eval().offloader(*[torch.zeros(1)] * 4) is None
    with torch.no_grad():
        assert model.train().offloader(*[torch.zeros(1)] * 4) is None


def test_a_run_with_offloading_and_tiles_trains_the_default_run(tiny_chat_dir, chat_data, tmp_path, monkeypatch):
    """3 steps of train.py (checkpointing on, so each block's input goes to the host) with
    --offload-activations and --tile-mlp 2: the losses of every step and the saved adapter equal
    the default run's (LoRA dropout 0: tiles draw their own masks), float32, to rounding."""
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    runs = {}
    for name, flags in {"plain": {}, "offloaded": {"offload_activations": True, "tile_mlp": 2}}.items():
        out = tmp_path / name
        runs[name] = train(config(tiny_chat_dir, chat_data, out, max_steps=3, grad_checkpointing=True,
                                  lora_dropout=0.0, **flags))
        runs[name]["adapter"] = (out / "adapter" / "adapter_model.safetensors").read_bytes()
        runs[name]["settings"] = json.loads((out / "run_config.json").read_text())
    assert runs["offloaded"]["losses"] == pytest.approx(runs["plain"]["losses"], rel=1e-6)
    assert runs["offloaded"]["settings"]["offload_activations"] is True
    tensors = {name: safetensors.torch.load(run["adapter"]) for name, run in runs.items()}
    worst = max(((tensors["offloaded"][k] - v).abs().max() / v.abs().max()).item() for k, v in tensors["plain"].items())
    # float32 matmuls over tiles round in another order, and AdamW divides each gradient by its own
    # running RMS, so where a gradient is near zero a rounding difference moves the update itself:
    # the bound is 1e-3 of each tensor's scale, far below what one step moves it (lr 1e-3 per element).
    assert worst <= 1e-3
