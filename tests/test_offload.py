"""--offload-activations (model/offload.py) moves what autograd saves to host memory and back, and
changes nothing it computes: in float64 the loss and every LoRA gradient equal the plain run's
exactly, with and without checkpointing, on packed rows, with --tile-mlp, with DoRA and with an
NF4 base; compiled blocks take it too; the tensors really leave (each block's saved tensors are
packed to the host and come back in backward, the next block's ahead); and a 3-step train.py run
with it (and with --tile-mlp) trains what the default run trains.
"""

import contextlib
import json
import shutil

import pytest
import safetensors.torch
import torch

import lora
from conftest import ROOT, save_tiny_hf
from model import load_model, offload
from model.loss import lm_loss_sum
from test_train import config
from train import main as train_main
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


@pytest.fixture(scope="module")
def untied_chat_dir(smollm2_dir, tmp_path_factory):
    """tiny_chat_dir's shape and tokenizer, with lm_head its own matrix: a table --offload-embeddings
    can move."""
    path = save_tiny_hf(tmp_path_factory.mktemp("untied") / "chat", vocab_size=49152, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2, intermediate_size=128, initializer_range=0.2,
                        max_position_embeddings=1024)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, path / name)
    return path


def test_the_embedding_table_in_host_memory_trains_the_default_run(untied_chat_dir, chat_data, tmp_path):
    """--offload-embeddings: each batch brings its rows of the table (looked up as the batch is
    made, the validation batches too) and the model starts from them: the same losses, evaluation
    and adapter, bit for bit, as the plain run; the table itself ends up on the host."""
    runs = {}
    for name, flags in {"plain": {}, "host": {"offload_embeddings": True}}.items():
        out = tmp_path / name
        runs[name] = train(config(untied_chat_dir, chat_data, out, max_steps=3, eval_every=3, **flags))
        runs[name]["adapter"] = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert runs["host"]["losses"] == runs["plain"]["losses"] and runs["host"]["last_val"] == runs["plain"]["last_val"]
    assert runs["host"]["adapter"] == runs["plain"]["adapter"]
    assert runs["host"]["model"].model.embed_tokens.weight.device.type == "cpu"


@pytest.mark.parametrize("flags, message", [
    (["--offload-embeddings"], "ties the embedding table to lm_head"),
    (["--offload-embeddings", "--objective", "dpo", "--data", str(ROOT / "examples" / "preferences.jsonl")],
     "--offload-embeddings is for --objective sft yet"),
    (["--offload-activations", "--parallel", "fsdp"], "--offload-activations does not combine with --parallel fsdp"),
])
def test_flags_that_do_not_apply_are_one_line(flags, message, tiny_chat_dir, chat_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_main(["--model", str(tiny_chat_dir), "--data", str(chat_data), "--output-dir", str(tmp_path / "r"),
                    "--max-steps", "1", "--device", "cpu", *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "r" / "adapter").exists()
