"""What the CPU can show of training's CUDA paths, with pretend GPUs where it needs them.

A checkpoint holds the RNG state of its process's own GPU alone, so it resumes where fewer GPUs
are visible; the lists of every visible GPU's state that older checkpoints hold still load, and a
malformed RNG entry is a CheckpointError naming the file. Clipping FSDP2's sharded gradients reads
nothing back to the host and equals clip_grad_norm_. Batches for CUDA are pinned before their
non_blocking copy (on the CPU nothing is). The reserved memory is reported beside the allocated.
The tiny model and data are those of test_train.py.
"""

import io
import json
import shutil
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import data
from training import metrics, run_dir
from training import loop as train_loop, phases as train_phases
from training.checkpoint import CheckpointError
from model.runtime import peak_memory_gib, peak_reserved_gib
from test_train import DeviceSyncs, config
from training.batches import step_batch
from training.loop import train
from training import step as train_step_module
from training.step import clip_gradients


# ----------------------------------------------------------------------------- RNG states

class PretendGPUs:
    """torch.cuda's RNG calls on `visible` pretend GPUs, this process on GPU `current`. GPU d's
    state is 16 bytes of value 10 + d; a GPU index that is not visible raises as CUDA does."""

    def __init__(self, visible: int, current: int = 0):
        self.visible, self.current, self.restored = visible, current, {}  # restored: {GPU: state}

    def index(self, device) -> int:
        d = device if isinstance(device, int) else torch.device(device).index
        d = self.current if d is None else d
        if not 0 <= d < self.visible:
            raise RuntimeError("CUDA error: invalid device ordinal")
        return d

    def get_rng_state(self, device="cuda"):
        return torch.full((16,), 10 + self.index(device), dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        self.restored[self.index(device)] = state

    def get_rng_state_all(self):
        return [self.get_rng_state(d) for d in range(self.visible)]

    def set_rng_state_all(self, states):
        for d, state in enumerate(states):
            self.set_rng_state(state, d)

    @contextmanager
    def active(self):
        with pytest.MonkeyPatch.context() as m:
            for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
                m.setattr(torch.cuda, name, getattr(self, name))
            for name in ("is_available", "is_initialized"):
                m.setattr(torch.cuda, name, lambda: True)
            m.setattr(torch.cuda, "current_device", lambda: self.current)
            m.setattr(torch.cuda, "device_count", lambda: self.visible)
            yield


def gpus_while(monkeypatch, name: str, gpus: PretendGPUs):
    """Run train.py's save_checkpoint or load_checkpoint (name) with the pretend GPUs; the rest of
    the run stays on the CPU as it is."""
    module = {"save_checkpoint": train_loop, "load_checkpoint": train_phases}[name]
    real = getattr(module, name)

    def with_gpus(*args, **kwargs):
        with gpus.active():
            return real(*args, **kwargs)
    monkeypatch.setattr(module, name, with_gpus)


@pytest.fixture(scope="module")
def saved_on_gpu_1_of_2(tiny_chat_dir, chat_data, tmp_path_factory):
    """A 2-step run whose checkpoints were written by a process on GPU 1 of 2 visible."""
    out = tmp_path_factory.mktemp("gpus") / "run"
    with pytest.MonkeyPatch.context() as m:
        gpus_while(m, "save_checkpoint", PretendGPUs(visible=2, current=1))
        train(config(tiny_chat_dir, chat_data, out, max_steps=2, save_every=1))
    return out


def resumed(saved, tmp_path, tiny_chat_dir, chat_data, monkeypatch, gpus: PretendGPUs, rng_change=None):
    """Resume a copy of `saved` for one more step with `gpus` visible, its step-2 RNG entry first
    changed by rng_change(rng); return what was restored to which GPU."""
    out = tmp_path / "resumed"
    shutil.copytree(saved, out)
    state_file = out / "checkpoints" / "step-000002" / "training_state.pt"
    if rng_change:
        state = torch.load(state_file, weights_only=True)
        rng_change(state["rng"])
        torch.save(state, state_file)
    gpus_while(monkeypatch, "load_checkpoint", gpus)
    train(config(tiny_chat_dir, chat_data, out, max_steps=3, save_every=1, resume=True))
    return gpus.restored


def test_a_checkpoint_holds_its_own_gpus_rng_and_resumes_with_fewer_gpus(
        saved_on_gpu_1_of_2, tmp_path, tiny_chat_dir, chat_data, monkeypatch):
    state = torch.load(saved_on_gpu_1_of_2 / "checkpoints" / "step-000002" / "training_state.pt", weights_only=True)
    assert torch.equal(state["rng"]["cuda"], PretendGPUs(2).get_rng_state(1))  # GPU 1's alone
    restored = resumed(saved_on_gpu_1_of_2, tmp_path, tiny_chat_dir, chat_data, monkeypatch, PretendGPUs(visible=1))
    assert restored.keys() == {0} and torch.equal(restored[0], state["rng"]["cuda"])  # onto this process's GPU


@pytest.mark.parametrize("visible, current, expected", [(1, 0, 0), (4, 1, 1), (4, 3, None)])
def test_an_older_checkpoints_list_of_states_restores_this_gpus_entry(
        saved_on_gpu_1_of_2, tmp_path, tiny_chat_dir, chat_data, monkeypatch, visible, current, expected):
    """Checkpoints written before hold a state per GPU visible then (here 2): this GPU's entry is
    restored; a GPU whose index the list lacks restores none, and the run goes on."""
    saved_states = PretendGPUs(2).get_rng_state_all()
    restored = resumed(saved_on_gpu_1_of_2, tmp_path, tiny_chat_dir, chat_data, monkeypatch,
                       PretendGPUs(visible, current), rng_change=lambda rng: rng.update(cuda=saved_states))
    if expected is None:
        assert restored == {}
    else:
        assert restored.keys() == {current} and torch.equal(restored[current], saved_states[expected])


@pytest.mark.parametrize("entry, value", [("cuda", "not a state"), ("torch", torch.zeros(3, dtype=torch.uint8)),
                                          ("python", (3, 7))])
def test_a_malformed_rng_entry_is_a_checkpoint_error(saved_on_gpu_1_of_2, tmp_path, tiny_chat_dir, chat_data,
                                                     monkeypatch, entry, value):
    with pytest.raises(CheckpointError, match=r"step-000002 does not load \(training_state.pt: RNG state"):
        resumed(saved_on_gpu_1_of_2, tmp_path, tiny_chat_dir, chat_data, monkeypatch, PretendGPUs(visible=1),
                rng_change=lambda rng: rng.update({entry: value}))


# ----------------------------------------------------------------------------- FSDP2's clipping

@pytest.fixture
def one_rank_group():
    """A process group of this process alone (gloo), so that DTensor shards exist in the test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and left as they are
def test_clipping_sharded_gradients_reads_nothing_and_equals_clip_grad_norm(one_rank_group, max_norm):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    plain = [torch.nn.Parameter(torch.randn(n, 4)) for n in (8, 3, 5)]
    for p in plain:
        p.grad = torch.randn_like(p)
    sharded = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in plain]
    for p, q in zip(sharded, plain):
        p.grad = distribute_tensor(q.grad.clone(), mesh, [Shard(0)])
    counter = DeviceSyncs()
    with counter:
        norm = clip_gradients(sharded, max_norm)
    assert counter.count == 0  # the factor multiplied each shard's local tensor on the device
    expected = torch.nn.utils.clip_grad_norm_(plain, max_norm)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for p, q in zip(sharded, plain):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- pinned batches

def test_cuda_batches_are_pinned_before_their_non_blocking_copy(monkeypatch):
    """Every tensor of a batch for CUDA (packed: with the documents' cu_seqlens) is pinned, then
    copied with non_blocking=True to the GPU named with its index; for the CPU none is pinned."""
    pinned_ids, copies = set(), []
    real_to = torch.Tensor.to

    def pin_memory(t):
        p = t.clone()
        pinned_ids.add(id(p))
        return p

    def to(t, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if isinstance(device, torch.device) and device.type == "cuda":
            copies.append((id(t) in pinned_ids, kwargs.get("non_blocking", False), device))
            return t
        return real_to(t, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    rows = [[{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]]
    batch = data.collate(rows, pad_id=0, pack=True)
    moved = step_batch(batch, torch.device("cuda", 1))
    tensors = len(batch) + 2  # + trained_index, and documents' cu_seqlens
    assert copies == [(True, True, torch.device("cuda", 1))] * tensors
    assert moved["n_trained"] == 3 and moved["n_tokens"] == 5  # counted on the CPU, before the copy
    copies.clear()
    step_batch(batch, "cpu")
    assert len(pinned_ids) == tensors and not copies  # nothing more pinned, nothing sent to a GPU


# ----------------------------------------------------------------------------- peak memory

def test_reserved_memory_is_reported_beside_the_allocated(monkeypatch, tmp_path):
    cpu_peak = peak_memory_gib()
    assert peak_reserved_gib() == pytest.approx(cpu_peak, rel=0.05)  # the CPU: both the peak RSS
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 5 * 2**30)
    assert (peak_memory_gib(), peak_reserved_gib()) == (3, 5)
    step = train_step_module.Step(loss=1.0, grad_norm=0.5, tokens=10, trained_tokens=4, loss_scale=None, skipped=False,
                             stats={})
    row = step.row(1, 1e-3, 1.0, SimpleNamespace(device="cuda", t_start=0.0, elapsed_before=0.0), epoch=0)
    assert (row["max_memory_gib"], row["max_reserved_gib"]) == (3, 5)
    from rich.console import Console
    logs = metrics.RunLog(tmp_path, Console(file=io.StringIO()), 1, 1, None, {}, {}, {})
    drawn = []
    logs.writer = SimpleNamespace(add_scalar=lambda tag, value, step: drawn.append((tag, value)),
                                  close=lambda: None)
    logs.step(row)
    logs.close()
    assert ("train/max_memory_gib", 3) in drawn and ("train/max_reserved_gib", 5) in drawn
    metrics.write_summary(tmp_path, steps=1)
    summary = json.loads((tmp_path / run_dir.SUMMARY_FILE).read_text())
    assert (summary["peak_memory_gib"], summary["peak_reserved_gib"]) == (3, 5)
