"""training/parallel.py under torchrun on the CPU (gloo, 2 processes): DDP and FSDP2 train what one process does.

2 ranks x micro-batch 2 give the adapter of 1 process x micro-batch 4 (fp32, to rounding), under
DDP and under FSDP2, through an epoch end where one rank's slice of a micro-batch is empty;
checkpoints move between one process and FSDP2 in both directions; DDP resume (with dropout) is
bit for bit; a step waits for the device once, as in one process; a rank that fails ends the job
with its error, and one that hangs times out.
The tiny model and data are those of test_train.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch

import lora
from training import parallel
from conftest import ROOT
from model import load_model
from model.loss import LanguageModelLoss
from test_train import adapter, config, metrics
from training.settings import TrainConfig, TrainError, check_config
from training.loop import train

# 21 training examples (3 of the 24 held out): a global micro-batch of 4 leaves 1 example at each
# epoch's end, so rank 1's slice is empty there. 3 steps per epoch: step 3 has that tail.
RUN = dict(val_fraction=0.125, eval_every=2, max_steps=4, grad_accum=2, save_every=2, keep_checkpoints=5)


def cli_args(cfg: TrainConfig) -> list[str]:
    """The flags that give `cfg` to train.py (those differing from the defaults)."""
    args = []
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        name = "--" + f.name.replace("_", "-")
        args += [name if value else "--no-" + name[2:]] if f.type is bool else [name, str(value)]
    return args


def torchrun(cfg: TrainConfig, script=ROOT / "train.py", timeout=180, paths=()) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 script ...flags`, each rank on one CPU thread;
    `paths` are on the ranks' python path after the repository (a test's reward module)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), *cli_args(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(map(str, [ROOT, *paths]))}
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_ok(cfg: TrainConfig, paths=()):
    result = torchrun(cfg, paths=paths)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_adapter(a: dict, b: dict):
    # Equal to rounding, amplified by Adam on a few elements: it divides each gradient by its own
    # RMS, so where a step's gradient nearly cancels (3.1e-3 - 3.1e-3 at one element here) the
    # order of the sum over ranks shows in the update (up to 1.2e-5, with updates of lr = 1e-2).
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=5e-5), (k, max_diff(a, b))


def cut_at_step_2(full, cut):
    """A copy of run `full` as if it had stopped after its step-2 checkpoint."""
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000004")
    shutil.rmtree(cut / "adapter")
    (cut / "summary.json").unlink()
    rows = [m for m in metrics(full) if m["step"] <= 2]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in rows))


@pytest.fixture(scope="module")
def single(tiny_chat_dir, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    train(config(tiny_chat_dir, chat_data, out, micro_batch_size=4, **RUN))
    return out


@pytest.fixture(scope="module")
def fsdp(tiny_chat_dir, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_ok(config(tiny_chat_dir, chat_data, out, micro_batch_size=2, parallel="fsdp", **RUN))
    return out


def assert_same_run(run, single):
    assert_same_adapter(adapter(run), adapter(single))
    a, b = metrics(run), metrics(single)  # rank 0 alone wrote: one line per step, as one process
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3, 4]
    for m, n in zip(a, b):
        assert m.get("trained_tokens") == n.get("trained_tokens") and m.get("tokens") == n.get("tokens")
        assert m.keys() == n.keys()
        for key in {"loss", "grad_norm", "val_loss"} & n.keys():
            assert m[key] == pytest.approx(n[key], rel=1e-5), key


def tensorboard_files(run) -> int:
    return len(list((run / "tensorboard").glob("events.out.tfevents.*")))


def test_ddp_two_ranks_equal_one_process(tiny_chat_dir, chat_data, single, tmp_path):
    out = tmp_path / "ddp"
    run_ok(config(tiny_chat_dir, chat_data, out, micro_batch_size=2, parallel="ddp", **RUN))
    assert_same_run(out, single)
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    assert tensorboard_files(out) == 1  # rank 0's
    print(f"DDP vs one process: max |adapter difference| {max_diff(adapter(out), adapter(single)):.2e}")


def test_fsdp_two_ranks_equal_one_process(fsdp, single):
    assert_same_run(fsdp, single)
    assert tensorboard_files(fsdp) == 1
    state = torch.load(fsdp / "checkpoints" / "step-000004" / "training_state.pt", weights_only=True)
    assert len(state["rng_ranks"]) == 2
    exp_avg = next(iter(state["optimizer"]["state"].values()))["exp_avg"]
    assert type(exp_avg) is torch.Tensor  # gathered whole, not a DTensor shard
    print(f"FSDP vs one process: max |adapter difference| {max_diff(adapter(fsdp), adapter(single)):.2e}")


def test_fsdp_checkpoint_resumes_in_one_process(tiny_chat_dir, chat_data, fsdp, single, tmp_path):
    """The FSDP2 run's step-2 checkpoint, finished by one process, ends where one process does."""
    cut = tmp_path / "cut"
    cut_at_step_2(fsdp, cut)
    train(config(tiny_chat_dir, chat_data, cut, micro_batch_size=4, resume=True, **RUN))
    assert_same_run(cut, single)


def test_one_process_checkpoint_resumes_under_fsdp(tiny_chat_dir, chat_data, single, tmp_path):
    cut = tmp_path / "cut"
    cut_at_step_2(single, cut)
    run_ok(config(tiny_chat_dir, chat_data, cut, micro_batch_size=2, parallel="fsdp", resume=True, **RUN))
    assert_same_run(cut, single)


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_ranks_read_only_their_rows(tmp_path, tied):
    """Under FSDP2 the model is built on meta and sharded before it has weights; each rank then
    reads only its rows of each tensor (here 66 and 65 of the 131-row embeddings: an uneven split)
    and LoRA's A draws what one process draws. Gathered, every parameter equals load_model +
    inject_lora with the same seed, exactly; with tied embeddings lm_head stays tied."""
    from conftest import save_tiny_hf
    path = save_tiny_hf(tmp_path / "m", vocab_size=131, tie_word_embeddings=tied)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "fsdp_load_ranks.py"), str(path), str(tmp_path / "result")]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"result.rank{r}").read_text()) for r in (0, 1)]
    for r, got in enumerate(ranks):
        assert got["tied"] == tied
        assert got["diffs"] and max(got["diffs"].values()) == 0.0, got["diffs"]
        assert got["lora_A_sum"] > 0  # initialised, not left as to_empty's garbage or zeros
        rows = got["reads"]["model.embed_tokens.weight"]
        assert rows == ([[0, 66], [66, 64]] if r == 0 else [[66, 131], [65, 64]])
        assert all(read[0] is not None for read in got["reads"].values())  # no tensor read whole


def test_ddp_resume_reproduces_uninterrupted_run(tiny_chat_dir, chat_data, tmp_path):
    kw = dict(RUN, micro_batch_size=2, parallel="ddp", lora_dropout=0.1)  # each rank's dropout RNG
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_ok(config(tiny_chat_dir, chat_data, full, **kw))
    cut_at_step_2(full, cut)
    run_ok(config(tiny_chat_dir, chat_data, cut, resume=True, **kw))
    figures = lambda out: [(m["step"], m.get("loss"), m.get("grad_norm"), m.get("val_loss"))
                           for m in metrics(out)]
    assert figures(cut) == figures(full)  # bit for bit
    a, b = adapter(full), adapter(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_step_waits_for_the_device_once(tiny_chat_dir, chat_data, tmp_path, mode):
    """Under torchrun a step reads device values once, as one process does (tests/torchrun_syncs.py
    counts, on each rank): the token counts and the stop flag are summed over the gloo host group,
    in CPU tensors, two reductions a step; the loss sums on the device, before the step's one read;
    and clipping FSDP2's shards reads nothing."""
    out = tmp_path / "run"
    cfg = config(tiny_chat_dir, chat_data, out, micro_batch_size=2, grad_accum=2, max_steps=6, parallel=mode)
    result = torchrun(cfg, script=ROOT / "tests" / "torchrun_syncs.py")
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((out / f"syncs.rank{rank}.json").read_text())
        assert got == {"syncs_per_step": 1, "host_reductions_per_step": 2, "misplaced": []}, (rank, got)


FAILING_RANK = """
import importlib, os, time
import train
module = importlib.import_module("{module}")
if os.environ["RANK"] == "1":
    real, calls = module.{target}, []
    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == {call}:
            {action}
        return real(*args, **kwargs)
    setattr(module, "{target}", failing)
train.main()
"""


@pytest.mark.parametrize("module, target, call, action, timeout, message", [
    # rank 1 raises in step 2, after the ranks have been exchanging gradients: torchrun reports
    # its error as the root cause and stops rank 0
    ("training.step", "forward_loss", 3, 'raise RuntimeError("failure on rank 1")', 600, "RuntimeError: failure on rank 1"),
    # rank 1 hangs while loading the model: rank 0 waits in a collective until --parallel-timeout
    ("training.phases", "load_model", 1, "time.sleep(600)", 3, "Timed out"),
])
def test_a_failing_rank_ends_the_job(tiny_chat_dir, chat_data, tmp_path, module, target, call, action, timeout,
                                     message):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK.format(module=module, target=target, call=call, action=action))
    cfg = config(tiny_chat_dir, chat_data, tmp_path / "run", micro_batch_size=2, grad_accum=2, max_steps=4,
                 parallel_timeout=float(timeout))
    t0 = time.perf_counter()
    result = torchrun(cfg, script=script, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert time.perf_counter() - t0 < 60, result.stderr[-3000:]  # not a hang: torchrun stopped the other rank


def test_empty_slice_trains_nothing(tiny_chat_dir):
    model = load_model(tiny_chat_dir)
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_()  # B != 0, so every LoRA parameter has a gradient path
    loss, count = LanguageModelLoss(model)(parallel.empty_batch(pad_id=0))
    loss.backward()
    assert count == 0 and loss.item() == 0.0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)  # joins DDP's all-reduce with zeros
    assert parallel.rank_share([1, 2, 3], 2) == [1, 2]  # one process: rank 0 takes the first slice


@pytest.mark.parametrize("kw, message", [
    (dict(parallel="fsdp", quantize="nf4"), "cannot shard NF4"),
    (dict(parallel="fsdp", precision="fp16"), "use bf16"),
    (dict(parallel="zero3"), "expected one of ddp, fsdp"),
])
def test_unsupported_combinations_are_refused(kw, message):
    with pytest.raises(TrainError, match=message):
        check_config(TrainConfig(**kw))


def test_fsdp_on_a_torch_without_fsdp2_is_refused(monkeypatch):
    assert parallel.fsdp2_available()  # the pinned torch has it
    check_config(TrainConfig(parallel="fsdp"))
    monkeypatch.setattr(parallel, "fsdp2_available", lambda: False)
    with pytest.raises(TrainError, match=r"--parallel fsdp: this torch \(.*\) lacks"):
        check_config(TrainConfig(parallel="fsdp"))
