"""train.py: accumulation is exact, resume is bit for bit (the batches made ahead on a thread, the
data position saved that of the step), failures are caught and named, a step waits for the device once.

Runs on a tiny random Llama (2 layers, 64 wide) that carries the real SmolLM2 tokenizer and chat
template, on a small data set written here, in fp32 on the CPU.
"""

import json
import math
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from training.flags import parse_config
from training import batches as train_batches, phases as train_phases
from conftest import ROOT, save_tiny_hf
from training.checkpoint import CheckpointError
from training.settings import TrainConfig
from training.loop import train
from training.step import lr_at



def config(tiny_chat_dir, chat_data, out, **kw) -> TrainConfig:
    base = dict(model=str(tiny_chat_dir), data=str(chat_data), output_dir=str(out), val_fraction=0.0,
                max_steps=4, micro_batch_size=4, grad_accum=1, lr=1e-2, lora_r=4, lora_alpha=8,
                lora_dropout=0.0, warmup_ratio=0.0, sample_prompts="", precision="fp32", device="cpu")
    return TrainConfig(**{**base, **kw})


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_equals_big_batch(tiny_chat_dir, chat_data, tmp_path):
    big = config(tiny_chat_dir, chat_data, tmp_path / "big", micro_batch_size=4, grad_accum=1)
    small = config(tiny_chat_dir, chat_data, tmp_path / "small", micro_batch_size=1, grad_accum=4)
    train(big), train(small)
    big_m, small_m = metrics(tmp_path / "big"), metrics(tmp_path / "small")
    assert [m["trained_tokens"] for m in big_m] == [m["trained_tokens"] for m in small_m]
    # Step 1 starts from the same weights: its loss and gradient norm differ only by the order of
    # float32 sums (micro-batch by micro-batch against all at once).
    assert big_m[0]["loss"] == pytest.approx(small_m[0]["loss"], rel=1e-6)
    assert big_m[0]["grad_norm"] == pytest.approx(small_m[0]["grad_norm"], rel=1e-6)
    # After 4 AdamW steps at lr 1e-2 the adapters carry that rounding as Adam amplifies it (it
    # divides by sqrt(v)): about 2e-7 here, as large as the difference between the fused and the
    # unrolled AdamW on identical gradients (1.3e-7). At an element whose gradient nearly cancels,
    # Adam's update follows the rounding itself, up to a fraction of lr: one element of the 6,912
    # differs by 3.3e-5 here. Micro-batches weighted by their own tokens instead of the step's
    # move the adapters by ~2e-2.
    a, b = adapter(tmp_path / "big"), adapter(tmp_path / "small")
    assert a.keys() == b.keys() and len(a) > 0
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    beyond_rounding = torch.cat([((a[k] - b[k]).abs() > 5e-7 + 1e-5 * b[k].abs()).flatten() for k in a])
    assert diff.max() <= 1e-4 and beyond_rounding.float().mean() <= 1e-3, (diff.max(), beyond_rounding.sum())


def test_reference_run_equals_the_default_one(tiny_chat_dir, chat_data, tmp_path):
    """train.py --textbook (every fast piece replaced by its textbook twin, model/fused.py) trains
    the run the default one does, with dropout: the same loss and gradient norm at every step, to
    float32 rounding of sums taken in other orders, and the same adapter, up to that rounding as
    Adam amplifies it (see test_accumulation_equals_big_batch)."""
    kw = dict(max_steps=3, lora_dropout=0.1, micro_batch_size=2, grad_accum=2)
    fast, textbook = tmp_path / "fast", tmp_path / "textbook"
    train(config(tiny_chat_dir, chat_data, fast, **kw))
    train(config(tiny_chat_dir, chat_data, textbook, textbook=True, **kw))
    assert json.loads((textbook / "run_config.json").read_text())["textbook"] is True
    for m, n in zip(metrics(fast), metrics(textbook), strict=True):
        assert m["loss"] == pytest.approx(n["loss"], rel=1e-5) and m["grad_norm"] == pytest.approx(n["grad_norm"], rel=1e-5)
    a, b = adapter(fast), adapter(textbook)
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    beyond_rounding = torch.cat([((a[k] - b[k]).abs() > 5e-7 + 1e-5 * b[k].abs()).flatten() for k in a])
    assert diff.max() <= 1e-4 and beyond_rounding.float().mean() <= 1e-3, (diff.max(), beyond_rounding.sum())


def test_resume_reproduces_uninterrupted_run(tiny_chat_dir, chat_data, tmp_path):
    kw = dict(max_steps=8, save_every=3, keep_checkpoints=5, lora_dropout=0.1, micro_batch_size=2,
              grad_accum=2)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(config(tiny_chat_dir, chat_data, full, **kw))
    # The interrupted run: everything after the step-3 checkpoint never happened.
    shutil.copytree(full, cut)
    for later in ("step-000006", "step-000008"):
        shutil.rmtree(cut / "checkpoints" / later)
    shutil.rmtree(cut / "adapter")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(full)[:3]))
    train(config(tiny_chat_dir, chat_data, cut, resume=True, **kw))
    losses = lambda out: [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(out)]
    assert losses(cut) == losses(full)  # bit for bit
    a, b = adapter(full), adapter(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def run_cut_at_step_2(tiny_chat_dir, chat_data, out):
    """A 4-step run whose steps 3 and 4 were logged (metrics.jsonl, TensorBoard) but whose step-4
    checkpoint and adapter were lost, as a kill before its save leaves it."""
    train(config(tiny_chat_dir, chat_data, out, max_steps=4, save_every=2))
    shutil.rmtree(out / "checkpoints" / "step-000004")
    shutil.rmtree(out / "adapter")


def test_tensorboard_is_continuous_across_a_resume(tiny_chat_dir, chat_data, tmp_path):
    """The resumed run hides the interrupted run's events after the checkpoint's step and logs them
    again; the checkpoint's own step stays: each step once, none missing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    run_cut_at_step_2(tiny_chat_dir, chat_data, out)
    train(config(tiny_chat_dir, chat_data, out, max_steps=4, save_every=2, resume=True))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([m["loss"] for m in metrics(out)])


def test_elapsed_goes_on_across_a_resume(tiny_chat_dir, chat_data, tmp_path):
    """elapsed_s after a resume is the checkpoint's, plus the time since the resume."""
    import time
    out = tmp_path / "run"
    run_cut_at_step_2(tiny_chat_dir, chat_data, out)
    rows = metrics(out)
    rows[1]["elapsed_s"] = 1000.0  # the interrupted run had trained for 1000 s by its checkpoint
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in rows))
    t0 = time.perf_counter()
    train(config(tiny_chat_dir, chat_data, out, max_steps=4, save_every=2, resume=True))
    took = time.perf_counter() - t0
    elapsed = [m["elapsed_s"] for m in metrics(out)]
    assert elapsed[1] == 1000.0 and 1000.0 < elapsed[2] < elapsed[3] < 1000.0 + took


def test_checkpoints_save_the_data_position_of_their_own_step(tiny_chat_dir, chat_data, tmp_path):
    """The steps' batches are made ahead of them, on a thread (data.Prefetcher); a checkpoint still
    holds the position after its own step's micro-batches, not after those read ahead. 24 examples
    in micro-batches of 2 and steps of 4 of them: 3 steps an epoch, then the next epoch."""
    out = tmp_path / "run"
    train(config(tiny_chat_dir, chat_data, out, max_steps=5, save_every=1, keep_checkpoints=5, micro_batch_size=2,
                 grad_accum=4))
    saved = [json.loads((p / "trainer_state.json").read_text()) for p in sorted((out / "checkpoints").iterdir())]
    assert [(s["step"], s["epoch"], s["index"]) for s in saved] == [(1, 0, 4), (2, 0, 8), (3, 0, 12), (4, 1, 4),
                                                                      (5, 1, 8)]
    assert [m["epoch"] for m in metrics(out)] == [0, 0, 0, 1, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["peak_reserved_gib"] == pytest.approx(summary["peak_memory_gib"], rel=0.05)  # the CPU: peak RSS


def test_loss_falls_and_only_lora_changes(tiny_chat_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    summary = train(config(tiny_chat_dir, chat_data, out, max_steps=30, lr=2e-2, micro_batch_size=8))
    losses = summary["losses"]
    assert losses[-1] < 0.5 * losses[0]
    base = load_file(tiny_chat_dir / "model.safetensors")
    state = summary["model"].state_dict()
    for k, v in base.items():
        assert torch.equal(state[k], v), f"{k} changed"
    assert all("lora_" in n for n, p in summary["model"].named_parameters() if p.requires_grad)


@pytest.mark.parametrize("schedule, step, expected", [
    ("cosine", 0, 0.25), ("cosine", 3, 1.0), ("cosine", 4, 1.0),
    ("cosine", 8, 0.1 + 0.9 * 0.5 * (1 + math.cos(0.4 * math.pi))),
    ("cosine", 13, 0.1 + 0.9 * 0.5 * (1 + math.cos(0.9 * math.pi))),
    ("linear", 8, 0.1 + 0.9 * 0.6), ("linear", 13, 0.1 + 0.9 * 0.1),
    ("constant", 2, 0.75), ("constant", 10, 1.0),
])
def test_lr_schedule(schedule, step, expected):
    cfg = TrainConfig(lr=1.0, lr_schedule=schedule, min_lr_ratio=0.1)
    # 14 steps, 4 of warmup: warmup gives 1/4, 2/4, 3/4, 4/4; the decay runs over the other 10
    assert lr_at(step, cfg, total_steps=14, warmup=4) == pytest.approx(expected)


def test_checkpoint_rotation(tiny_chat_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_chat_dir, chat_data, out, max_steps=8, save_every=2, keep_checkpoints=2))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000008"]


def test_crash_during_save_keeps_previous_checkpoint(tiny_chat_dir, chat_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def crashing_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 half a zip")
            raise OSError(28, "No space left on device")  # ENOSPC, as a full disk raises it
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(CheckpointError, match=r"step-000004: could not be written \(No space left on "
                       r"device.*\); the previous checkpoint .*step-000002 is kept"):
        train(config(tiny_chat_dir, chat_data, out, max_steps=4, save_every=2))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # the .tmp is gone
    (out / "checkpoints" / "step-000004.tmp").mkdir()  # as a SIGKILL mid-save leaves it
    summary = train(config(tiny_chat_dir, chat_data, out, max_steps=4, save_every=2, resume=True))
    assert summary["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_nonfinite_gradient_names_the_module(tiny_chat_dir, chat_data, tmp_path, monkeypatch):
    real_inject = train_phases.lora.inject_lora
    target = "model.layers.1.mlp.down_proj.lora_B.weight"

    def inject_then_poison(model, *a, **kw):
        names = real_inject(model, *a, **kw)
        dict(model.named_parameters())[target].register_hook(lambda g: g * float("nan"))
        return names

    monkeypatch.setattr(train_phases.lora, "inject_lora", inject_then_poison)
    with pytest.raises(FloatingPointError, match=f"first non-finite gradient in {target}"):
        train(config(tiny_chat_dir, chat_data, tmp_path / "run", max_steps=3, save_every=1))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def poison_gradient(monkeypatch, target, steps):
    """Make `target`'s gradient inf in the given optimizer steps (1-based; None: every step)."""
    real_inject = train_phases.lora.inject_lora
    calls = []

    def inject_then_poison(model, *a, **kw):
        names = real_inject(model, *a, **kw)
        def hook(g):  # one backward per step here (grad_accum 1)
            calls.append(1)
            return g * float("inf") if steps is None or len(calls) in steps else g
        dict(model.named_parameters())[target].register_hook(hook)
        return names
    monkeypatch.setattr(train_phases.lora, "inject_lora", inject_then_poison)


def test_fp16_skipped_steps_are_logged_and_the_run_goes_on(tiny_chat_dir, chat_data, tmp_path, monkeypatch):
    poison_gradient(monkeypatch, "model.layers.0.self_attn.q_proj.lora_A.weight", steps={1})
    out = tmp_path / "run"
    summary = train(config(tiny_chat_dir, chat_data, out, max_steps=4, precision="fp16"))
    rows = metrics(out)
    assert [r["skipped"] for r in rows] == [True, False, False, False]
    assert [r["loss_scale"] for r in rows[:2]] == [65536.0, 32768.0]  # GradScaler halves on overflow
    assert all(math.isfinite(loss) for loss in summary["losses"])


def test_fp16_stops_after_too_many_skipped_steps(tiny_chat_dir, chat_data, tmp_path, monkeypatch):
    target = "model.layers.1.mlp.down_proj.lora_B.weight"
    poison_gradient(monkeypatch, target, steps=None)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=f"step 3: .*first non-finite gradient in {target} .*; 3 steps "
                       "in a row skipped by the fp16 loss scaler, the last at scale 16384"):
        train(config(tiny_chat_dir, chat_data, out, max_steps=6, precision="fp16", max_skipped_steps=3))
    assert [r["skipped"] for r in metrics(out)] == [True, True]
    assert json.loads((out / "summary.json").read_text())["diverged"] is True


def test_fp16_nan_loss_stops_at_once(tiny_chat_dir, chat_data, tmp_path, monkeypatch):
    real_load = train_phases.load_model

    def load_then_poison(*a, **kw):
        model = real_load(*a, **kw)
        model.model.norm.register_forward_hook(lambda m, i, o: o * float("nan"))
        return model
    monkeypatch.setattr(train_phases, "load_model", load_then_poison)
    with pytest.raises(FloatingPointError, match="step 1: loss nan"):
        train(config(tiny_chat_dir, chat_data, tmp_path / "run", max_steps=4, precision="fp16"))


class DeviceSyncs(TorchDispatchMode):
    """Counts the operations that make the host wait for a GPU: reading a value (item, int, float,
    bool: aten._local_scalar_dense), shapes that depend on values (nonzero, masked_select, boolean
    indexing), and tolist (`count_tolist`). It counts on the thread that made it, the loop's: the
    batch prefetcher's thread counts on the CPU, before the copy, by design (and dispatch modes
    are per thread). Not counted either: ops while `paused` is set (training/batches.step_batch, on the loop's
    thread for the validation batches) and reads of tensors marked host-only (`host_only`: under
    torchrun, the CPU tensors reduced over the gloo host group, in which no GPU takes part)."""
    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default, torch.ops.aten.is_nonzero.default}

    def __init__(self):
        super().__init__()
        self.count, self.paused, self.thread = 0, False, threading.get_ident()

    def counts(self, tensor) -> bool:
        return (threading.get_ident() == self.thread and not self.paused
                and not getattr(tensor, "host_only", False))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if (func in self.SYNCING or bool_index) and self.counts(args[0]):
            self.count += 1
        return func(*args, **(kwargs or {}))

    def count_tolist(self, monkeypatch):
        """Count Tensor.tolist too (it reads without a dispatched op), and pause in training/batches.step_batch."""
        real_step_batch, real_tolist = train_batches.step_batch, torch.Tensor.tolist

        def step_batch(*a, **kw):
            mine = threading.get_ident() == self.thread
            self.paused |= mine
            try:
                return real_step_batch(*a, **kw)
            finally:
                self.paused &= not mine

        def tolist(t):
            self.count += self.counts(t)
            return real_tolist(t)
        monkeypatch.setattr(train_batches, "step_batch", step_batch)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)


def syncs_per_step(monkeypatch, run) -> float:
    """Host syncs per optimizer step of run(steps, out) (a training run), counted by DeviceSyncs
    as the difference between a 5-step and a 2-step run: what the steps themselves cost."""
    counter = DeviceSyncs()
    counter.count_tolist(monkeypatch)
    counts = {}
    for steps in (2, 5):
        counter.count = 0
        with counter:
            run(steps)
        counts[steps] = counter.count
    return (counts[5] - counts[2]) / 3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_host_sync_per_optimizer_step(tiny_chat_dir, chat_data, tmp_path, monkeypatch, precision):
    run = lambda steps: train(config(tiny_chat_dir, chat_data, tmp_path / f"run{steps}", max_steps=steps,
                                     grad_accum=2, micro_batch_size=2, precision=precision))
    assert syncs_per_step(monkeypatch, run) == 1


def test_qlora_trains_on_cpu(tiny_chat_dir, chat_data, tmp_path):
    summary = train(config(tiny_chat_dir, chat_data, tmp_path / "q", quantize="nf4", max_steps=6))
    assert summary["losses"][-1] < summary["losses"][0]
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").exists()


def test_debug_grads_and_eval_outputs(tiny_chat_dir, chat_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(tiny_chat_dir, chat_data, out, max_steps=2, debug_grads=True, val_fraction=0.25,
                 eval_every=1, sample_prompts=str(ROOT / "examples" / "prompts.txt"), sample_tokens=4))
    err = capsys.readouterr().err
    assert "LoRA gradients, step 2" in err and "model.layers.1.mlp.down_proj" in err
    rows = metrics(out)
    assert rows[0]["step"] == 0 and "val_loss" in rows[0]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "tokens_per_s",
                "elapsed_s", "val_loss", "val_ppl"):
        assert key in rows[-1]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((out / "run_config.json").read_text())["lora_r"] == 4


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("args, message", [
    (["--lr-schedule", "wavy"], "--lr-schedule wavy: expected one of cosine, linear, constant"),
    (["--data", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    (["--config", "/nonexistent.toml"], "--config /nonexistent.toml: no such file"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    result = run_cli(*args, "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_the_reference_flag_was_renamed_textbook(tmp_path, capsys):
    """--reference (the textbook twins' old name) still works and says it was renamed; a config
    file or a run's run_config.json holding `reference` sets `textbook`."""
    assert parse_config(["--reference"]).textbook
    assert "note: --reference was renamed --textbook" in capsys.readouterr().err
    old = tmp_path / "old.json"
    old.write_text('{"reference": true}')
    assert parse_config(["--config", str(old)]).textbook
    assert not parse_config([]).textbook


def test_config_file_and_flags_win(tmp_path):
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('lr = 0.5\nlora-r = 3\nmax_steps = 7\n')
    cfg = parse_config(["--config", str(cfg_file), "--lr", "0.25"])
    assert (cfg.lr, cfg.lora_r, cfg.max_steps) == (0.25, 3, 7)


def test_default_run_completes(tmp_path):
    """`python train.py` with no arguments, shortened for CI to 2 steps and sample replies of 8 tokens."""
    result = run_cli("--max-steps", "2", "--sample-tokens", "8", "--output-dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = metrics(tmp_path / "demo")
    assert rows[-1]["step"] == 2 and "val_loss" in rows[0] and "val_loss" in rows[-1]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_chat_dir, chat_data, tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--model", str(tiny_chat_dir), "--data", str(chat_data),
                             "--output-dir", str(out), "--max-steps", "100000", "--sample-prompts", "",
                             "--val-fraction", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and metrics(out)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "continue with --resume" in err
    last = metrics(out)[-1]["step"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{last:06d}"]


FAULTS_ON_REALLOCATION = """
import resource, sys, torch
from model.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def cycle():
    x = torch.ones(16 * 2**20)  # 64 MB, like a chunk of logits or a step's activations
    del x
for _ in range(4):  # the heap settles
    cycle()
per_cycle = []
for _ in range(16):
    before = faults()
    cycle()
    per_cycle.append(faults() - before)
print(*per_cycle)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_pages_instead_of_faulting_them_in():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_ON_REALLOCATION, mode], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        return [int(n) for n in out.stdout.split()]
    block = 64 * 2**20 // 4096  # pages in one 64 MB block
    # glibc mmaps it afresh and unmaps it on free: every page of every cycle faults.
    assert all(n >= 0.9 * block for n in faults("default"))
    # Served again from the heap it went back to. Now and then a small allocation takes the front of
    # the freed block and the next one lands past it, faulting a whole block once (seen: 0 to 3 cycles
    # of 12, on different machines), so the check is on the typical cycle, not the total: at least
    # half the cycles fault under a tenth of a block. Without the setting none of them does.
    keep = faults("keep")
    assert sum(n < 0.1 * block for n in keep) >= len(keep) // 2, keep


def test_pack_with_validation(tiny_chat_dir, chat_data, tmp_path):
    """--pack with held-out validation data (the demo's default): the validation batches are
    packed the same way, and evaluation runs."""
    out = tmp_path / "packed"
    summary = train(config(tiny_chat_dir, chat_data, out, max_steps=2, pack=True, val_fraction=0.25))
    assert "val_loss" in summary["first_val"] and math.isfinite(summary["last_val"]["val_loss"])


def test_bf16_or_fp16_on_a_cpu_without_them_says_it_is_slow():
    """An explicit bf16/fp16 on a CPU whose flags lack native arithmetic for it gets one line;
    with the flag (AVX512-BF16, AMX, Arm's bf16), fp32, or CUDA, nothing."""
    from model.runtime import slow_precision_note
    avx2 = {"avx", "avx2", "fma"}
    assert "no native bf16" in slow_precision_note(torch.bfloat16, "cpu", avx2)
    assert "no native fp16" in slow_precision_note(torch.float16, "cpu", avx2 | {"avx512_bf16"})
    assert slow_precision_note(torch.bfloat16, "cpu", avx2 | {"avx512_bf16"}) is None
    assert slow_precision_note(torch.bfloat16, "cpu", {"asimd", "bf16"}) is None
    assert slow_precision_note(torch.float32, "cpu", avx2) is None
    assert slow_precision_note(torch.bfloat16, "cuda", avx2) is None


def test_every_adapter_carries_the_template_it_was_trained_with(tiny_chat_dir, chat_data, tmp_path):
    """A --template deepseek run saves DeepSeek's template (not the base's ChatML) beside the final
    adapter and each checkpoint's, as chat_template.jinja and in tokenizer_config.json, with the
    base's tokenizer.json, as PEFT and TRL save the tokenizer beside an adapter."""
    from data.templates import DEEPSEEK
    out = tmp_path / "run"
    train(config(tiny_chat_dir, chat_data, out, max_steps=2, save_every=1, keep_checkpoints=5, template="deepseek"))
    adapters = [out / "adapter", *(p / "adapter" for p in sorted((out / "checkpoints").iterdir()))]
    assert len(adapters) == 3
    for d in adapters:
        assert (d / "chat_template.jinja").read_text() == DEEPSEEK, d
        saved_config = json.loads((d / "tokenizer_config.json").read_text())
        assert saved_config["chat_template"] == DEEPSEEK, d
        base_config = json.loads((tiny_chat_dir / "tokenizer_config.json").read_text())
        assert {k: v for k, v in saved_config.items() if k != "chat_template"} == \
            {k: v for k, v in base_config.items() if k != "chat_template"}
        assert (d / "tokenizer.json").read_bytes() == (tiny_chat_dir / "tokenizer.json").read_bytes()


def test_validation_split_does_not_move_with_the_seed(tiny_chat_dir, chat_data, tmp_path):
    """The held-out set is drawn with --val-seed, not --seed: a seed sweep compares its runs on the
    same validation examples. Before any step B is zero, so the first validation loss is the base
    model's on the held-out set, whatever the seed: equal exactly when the sets are."""
    def first_val_loss(name, **kw):
        cfg = config(tiny_chat_dir, chat_data, tmp_path / name, max_steps=1, val_fraction=0.25, **kw)
        return train(cfg)["first_val"]["val_loss"]
    assert first_val_loss("a", seed=1) == first_val_loss("b", seed=2)
    assert first_val_loss("c", seed=1, val_seed=1) != first_val_loss("d", seed=1)
    assert json.loads((tmp_path / "c" / "run_config.json").read_text())["defining"]["val_seed"] == 1


def test_samples_come_from_the_runs_own_validation_prompts(tiny_chat_dir, chat_data, tmp_path):
    """Any data but the demo's: each eval answers the first user turns of the first 3 validation
    conversations (never the demo's English prompts); no validation data, no samples; the demo
    data keeps examples/prompts.txt; an explicit file, or '' for none, is honoured."""
    from training.flags import parse_config
    from training.settings import DEMO_PROMPTS
    assert parse_config(["--data", str(chat_data)]).sample_prompts is None
    assert parse_config([]).sample_prompts == str(DEMO_PROMPTS)
    assert parse_config(["--data", str(ROOT / "examples" / "train.json")]).sample_prompts == str(DEMO_PROMPTS)
    assert parse_config(["--data", str(chat_data), "--sample-prompts", ""]).sample_prompts == ""
    out = tmp_path / "own"
    train(config(tiny_chat_dir, chat_data, out, max_steps=1, val_fraction=0.25, sample_prompts=None, sample_tokens=2))
    replies = json.loads((out / "summary.json").read_text())["replies"]
    val_prompts = [f"What is {i} plus {i}?" for i in range(24)]
    assert len(replies) == 3 and all(p in val_prompts for p in replies)
    out = tmp_path / "none"
    train(config(tiny_chat_dir, chat_data, out, max_steps=1, sample_prompts=None, sample_tokens=2))
    assert not json.loads((out / "summary.json").read_text()).get("replies")


def test_resume_takes_the_device_of_this_machine(tiny_chat_dir, chat_data, tmp_path):
    """--resume with only --output-dir fills in the run's settings but not the device it resolved:
    a run made on a GPU machine (run_config.json says cuda) resumes here with --device auto."""
    from training.flags import parse_config
    out = tmp_path / "run"
    train(config(tiny_chat_dir, chat_data, out, max_steps=1))
    path = out / "run_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "device": "cuda"}))
    cfg = parse_config(["--resume", "--output-dir", str(out), "--max-steps", "2"])
    assert cfg.device == "auto" and cfg.model == str(tiny_chat_dir) and cfg.lora_r == 4
    assert train(cfg)["steps"] == 2
