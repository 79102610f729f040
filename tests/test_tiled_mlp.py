"""--tile-mlp: each MLP run over tiles of the sequence, each tile recomputed in its own backward.

Proves: in float64 the loss and every LoRA gradient of a model whose MLPs run in 2 or 3 tiles
(3 of T = 11: uneven) equal the untiled model's, with and without grad_checkpointing, on plain
rows and on packed ones (document_ids); the tiles really are tiles: the LoRA gate/up group (the
fast path, lora/fused.py) sees T/N positions, never T, in forward and in backward's recompute,
and nothing (B, T, intermediate) is saved for backward; with LoRA dropout each tile's recompute
replays the masks of its forward; an NF4 base (QLoRA, float32) tiles to the untiled result within
float32 rounding; under textbook_path(), in eval mode, under no_grad and for T = 1 the MLP runs
untiled, and never in more tiles than T.
"""

import pytest
import torch

import lora
from conftest import rel, save_tiny_hf
from lora import fused as lora_fused
from model.fused import textbook_path
from model.load import load_model
from model.loss import lm_loss_sum

T = 11  # 3 tiles of 11 positions: 4, 4, 3
IDS = torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(1))
DOCUMENT_IDS = torch.tensor([[0] * 4 + [1] * 5 + [2] * 2, [0] * 7 + [1] * 4])  # (2, T) packed rows
POSITION_IDS = torch.tensor([list(range(4)) + list(range(5)) + list(range(2)),
                             list(range(7)) + list(range(4))])  # restart at each document


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiled") / "tiny-llama")


def lora_model(path, tile_mlp, grad_checkpointing=False, dtype=torch.float64, dropout=0.0, **quant):
    """A LoRA model on every linear of the blocks, random A and B (B = 0 would zero A's gradient),
    in training mode. In float64, A and B are float64 too, so LoRAGroup's written-out path runs."""
    model = load_model(path, dtype=dtype, grad_checkpointing=grad_checkpointing, tile_mlp=tile_mlp)
    cfg = lora.LoRAConfig(r=4, alpha=8, dropout=dropout, targets=lora.LLAMA_LINEARS)
    lora.inject_lora(model, cfg, **quant)
    if dtype == torch.float64:
        model.double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            for w in (m.lora_A.weight, m.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.05)
    return model.train()


def loss_and_grads(model, packed=False):
    """The summed token loss and the gradient of every LoRA weight, in model order."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)  # the dropout masks, where there is dropout
    extra = dict(position_ids=POSITION_IDS, document_ids=DOCUMENT_IDS) if packed else {}
    loss, _ = lm_loss_sum(model, IDS, IDS, **extra)
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["kept", "checkpointed"])
def test_tiled_equals_untiled_in_float64(model_dir, grad_checkpointing, packed):
    """Loss and every LoRA gradient, 2 tiles and 3 (uneven), against the untiled model's."""
    loss, grads = loss_and_grads(lora_model(model_dir, 1, grad_checkpointing), packed)
    assert all(g.abs().sum() > 0 for g in grads)  # every LoRA weight matters: none is compared at zero
    for tiles in (2, 3):
        tiled_loss, tiled_grads = loss_and_grads(lora_model(model_dir, tiles, grad_checkpointing), packed)
        # Tiling changes only how many rows each matmul sees, so only float64 rounding differs
        # (eps 2^-52 ~ 2.2e-16 per op): 1e-13 of each gradient's scale is ~450 eps, while a wrong
        # tile (misplaced, dropped, recomputed from other inputs) moves it by order one.
        assert rel(tiled_loss, loss) < 1e-13
        assert max(rel(a, b) for a, b in zip(tiled_grads, grads, strict=True)) < 1e-13


def group_rows(monkeypatch):
    """The positions (dim 1) each gate/up LoRA group sees, as lora_fused.lora_forward is reached."""
    rows, real = [], lora_fused.lora_forward
    monkeypatch.setattr(lora_fused, "lora_forward",
                        lambda x, layers: (len(layers) == 2 and rows.append(x.shape[1])) or real(x, layers))
    return rows


@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["kept", "checkpointed"])
def test_the_tiles_are_tiles_in_forward_and_in_backward(model_dir, grad_checkpointing, monkeypatch):
    """Forward runs the gate/up group once a tile, on 4, 4 and 3 positions; backward runs it again
    on tiles only: each tile's recompute and, with grad_checkpointing, the block's recompute first,
    which runs the tiles under their own checkpoints, so that tiles are computed once more in their
    own backward (torch keeps the block recompute's last tile, whose backward comes first)."""
    model = lora_model(model_dir, 3, grad_checkpointing)
    rows = group_rows(monkeypatch)
    loss, _ = lm_loss_sum(model, IDS, IDS)
    layers = model.config.num_hidden_layers
    assert rows == [4, 4, 3] * layers
    rows.clear()
    loss.backward()
    assert set(rows) == {4, 3}  # never all T
    assert len(rows) > 3 * layers if grad_checkpointing else sorted(rows) == sorted([4, 4, 3] * layers)


def test_nothing_intermediate_wide_is_kept_for_backward(model_dir):
    """What autograd saves outside the tiles' checkpoints between forward and backward: untiled, the
    MLP's (B, T, intermediate) activations; tiled, none of them."""
    intermediate = load_model(model_dir).config.intermediate_size

    def saved_wide(tiles):
        shapes = []
        pack = lambda t: shapes.append(tuple(t.shape)) or t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm_loss_sum(lora_model(model_dir, tiles), IDS, IDS)
        return [s for s in shapes if len(s) == 3 and s[-1] == intermediate]

    assert (2, T, intermediate) in saved_wide(1)
    assert saved_wide(3) == []


@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["kept", "checkpointed"])
def test_dropout_masks_replayed_in_each_tiles_recompute(model_dir, grad_checkpointing):
    """With dropout, the reference runs the same tiles in the same order without checkpoints, so it
    draws the same masks in forward and keeps its activations; the tiled model's gradients equal it
    only if each tile's recompute replays its forward's masks. The masks matter: eval differs."""
    reference = lora_model(model_dir, 1, dropout=0.3)
    for layer in reference.model.layers:
        mlp = layer.mlp
        mlp.forward = lambda x, mlp=mlp: torch.cat([mlp.swiglu(t) for t in x.tensor_split(3, dim=1)], dim=1)
    _, expected = loss_and_grads(reference)
    _, grads = loss_and_grads(lora_model(model_dir, 3, grad_checkpointing, dropout=0.3))
    assert max(rel(a, b) for a, b in zip(grads, expected, strict=True)) < 1e-13  # float64 rounding, as above
    _, without = loss_and_grads(reference.eval())
    assert not all(torch.allclose(a, b) for a, b in zip(without, expected))


def test_untiled_on_the_textbook_path_in_eval_and_without_grad(model_dir):
    """On a plain model (no LoRA) gate_proj is called as a module, so a hook sees each call's rows."""
    model = load_model(model_dir, tile_mlp=3).train()
    rows = []
    for layer in model.model.layers:
        layer.mlp.gate_proj.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[1]))

    def rows_seen(ids=IDS):
        rows.clear()
        model(ids)
        return list(rows)

    layers = model.config.num_hidden_layers
    assert rows_seen() == [4, 4, 3] * layers  # the fast path in training tiles: the hook can tell
    with textbook_path():
        assert rows_seen() == [T] * layers
    with torch.no_grad():
        assert rows_seen() == [T] * layers
    assert rows_seen(IDS[:, :1]) == [1] * layers  # one position: one tile
    for layer in model.model.layers:
        layer.mlp.tiles = 16  # more tiles than positions: one a position
    assert rows_seen() == [1] * T * layers
    model.eval()
    assert rows_seen() == [T] * layers


def test_nf4_base_tiles_to_the_untiled_result(tmp_path):
    pytest.importorskip("bitsandbytes")
    path = save_tiny_hf(tmp_path / "nf4-llama", intermediate_size=128)  # bnb's CPU NF4 wants widths of 64s
    quant = dict(quantize="nf4", compute_dtype=torch.float32)
    untiled = lora_model(path, 1, dtype=torch.float32, **quant)
    assert hasattr(untiled.model.layers[0].mlp.gate_proj.weight, "quant_state")  # the base is NF4
    loss, grads = loss_and_grads(untiled)
    assert all(g.abs().sum() > 0 for g in grads)
    tiled_loss, tiled_grads = loss_and_grads(lora_model(path, 3, dtype=torch.float32, **quant))
    # float32 (eps 2^-23 ~ 1.2e-7 per op): the tiles' matmuls may round differently from the whole
    # sequence's; 1e-5 of each gradient's scale is ~80 eps, while a wrong tile moves it by order one.
    assert rel(tiled_loss, loss) < 1e-5
    assert max(rel(a, b) for a, b in zip(tiled_grads, grads, strict=True)) < 1e-5
