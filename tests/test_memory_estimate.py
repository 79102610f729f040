"""train.py --estimate-memory: the step run on fake tensors counts what the real step allocates.

The independent measure is the CPU allocator's own record: torch.profiler with profile_memory=True
logs every allocation and free of the real step (random weights of the same shapes, the same
worst batch, the run's own accumulate and update), and the running sum of those events, over the
bytes alive before it (weights, LoRA, batch), peaks where the step's memory peaks. The estimate
reads no weight and runs no kernel; its peak must land within 1% of that one.
"""

import json
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

import lora
import train
import training.estimate
import training.phases
import training.flags
import training.settings
from allocator import step_peak
from model import Llama, LlamaConfig, offload
from model.loss import LanguageModelLoss
from training import dpo, memory_estimate
from training.settings import TrainConfig

TINY = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)  # widths NF4 takes on the CPU (multiples of 64)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def settings(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(micro_batch_size=2, max_seq_len=128, lora_r=8, grad_accum=2, precision="fp32",
                                 device="cpu"), **kw})


def allocator_peak(cfg: TrainConfig, config: LlamaConfig) -> int:
    """The real step's peak on the CPU, as the allocator saw it (tests/allocator.py), over two
    steps of the run's own functions on random weights of the same shapes."""
    dtype = DTYPES[cfg.precision]
    torch.manual_seed(0)
    model = Llama(config, **training.phases.model_options(cfg)).to(dtype)
    model.rope_inv_freq = model.rope_inv_freq.float()
    lora.inject_lora(model, training.phases.lora_config(cfg), quantize=cfg.quantize, compute_dtype=dtype)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if cfg.lora_init != "default":
        lora.pissa_init_(lora.lora_modules(model), lora.pissa.niter_of(cfg.lora_init))
    loss_fn = (dpo.PreferenceLoss(model, cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_loss, cfg.dpo_rpo_alpha)
               if cfg.objective == "dpo" else LanguageModelLoss(model))
    return step_peak(cfg, model, loss_fn, dtype)


CASES = {
    "fp32": dict(),
    "fp32, no dropout": dict(lora_dropout=0.0),
    "fp32, checkpointing": dict(grad_checkpointing=True, lora_dropout=0.0),
    "fp32, checkpointing with dropout": dict(grad_checkpointing=True),
    "bf16": dict(precision="bf16", grad_accum=1),
    "bf16, two micro-batches": dict(precision="bf16"),
    "bf16, checkpointing": dict(precision="bf16", grad_checkpointing=True, lora_dropout=0.0, grad_accum=1),
    "fp16": dict(precision="fp16", grad_accum=1),
    "NF4 bf16": dict(quantize="nf4", precision="bf16", grad_accum=1, lora_dropout=0.0),
    "NF4 bf16, checkpointing": dict(quantize="nf4", precision="bf16", grad_checkpointing=True),
    "NF4 fp32": dict(quantize="nf4", lora_dropout=0.0, grad_accum=1),
    "packed": dict(pack=True),
    "DoRA": dict(dora=True),
    "PiSSA": dict(lora_init="pissa_niter_2", grad_accum=1),
    "DPO": dict(objective="dpo"),
    "DPO, reference precomputed": dict(objective="dpo", precompute_ref=True),
    "MLP tiled": dict(tile_mlp=4, lora_dropout=0.0),
    "MLP tiled, checkpointing": dict(tile_mlp=4, grad_checkpointing=True, lora_dropout=0.0),
}


@pytest.mark.parametrize("case", CASES)
def test_the_estimate_is_the_allocators_peak(case):
    """Within 1% (the issue's bound; on these cases the two agree to 0.1%): a tensor counted wrongly,
    or alive at the wrong time, shows as more."""
    cfg = settings(**CASES[case])
    config = LlamaConfig(**TINY)
    est = training.estimate.estimate_step(cfg, config, "cpu", DTYPES[cfg.precision])
    assert est.peak_bytes == pytest.approx(allocator_peak(cfg, config), rel=0.01)
    assert sum(est.categories.values()) == est.peak_bytes
    assert est.categories[memory_estimate.WEIGHTS] == sum(est.weights_by_kind.values())


def untracked_empty(self, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Host memory the CPU allocator's events do not see (numpy's), standing for the GPU run's
    pinned host memory, which the device's count leaves out."""
    import numpy as np
    return torch.from_numpy(np.empty(n * torch.tensor([], dtype=dtype).element_size(), dtype=np.uint8)).view(dtype)


@pytest.mark.parametrize("case", ["fp32, checkpointing", "bf16, checkpointing", "NF4 bf16, checkpointing",
                                  "fp32, no dropout", "NF4 bf16"])
def test_offloaded_activations_leave_the_device(case, monkeypatch):
    """--offload-activations on a 4-layer model: the estimate's device peak is below the plain
    step's by at most what went to the host (the host's peak is its own figure, never among the
    device's categories), and it is the allocator's, within 1% as above, with the offloaded copies
    made outside the allocator (as a GPU run makes them in host memory)."""
    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's saved tensors are all small
    cfg, config = settings(**CASES[case], offload_activations=True), LlamaConfig(**{**TINY, "num_hidden_layers": 4})
    plain = training.estimate.estimate_step(replace(cfg, offload_activations=False), config, "cpu",
                                            DTYPES[cfg.precision])
    est = training.estimate.estimate_step(cfg, config, "cpu", DTYPES[cfg.precision])
    assert 0 < plain.peak_bytes - est.peak_bytes <= est.host_peak_bytes
    assert memory_estimate.HOST not in est.categories and sum(est.categories.values()) == est.peak_bytes
    monkeypatch.setattr(offload.Offloader, "host_empty", untracked_empty)
    assert est.peak_bytes == pytest.approx(allocator_peak(cfg, config), rel=0.01)


def test_one_ddp_rank_of_two(tmp_path):
    """--estimate-world-size 2 --parallel ddp: rank 0 of a real two-rank run under torchrun (gloo),
    as its own allocator saw it: a replica, plus DDP's Reducer's buckets (a flat copy of the
    gradients)."""
    measured = torchrun_rank_peak(tmp_path, "ddp")
    with one_thread():  # as each rank ran (attention's buffers are per thread)
        est = training.estimate.estimate_step(settings(**RANKS, parallel="ddp", estimate_world_size=2), LlamaConfig(**TINY),
                                  "cpu", torch.bfloat16)
    assert est.categories[memory_estimate.BUCKETS] == est.categories[memory_estimate.LORA]
    assert est.peak_bytes == pytest.approx(measured, rel=0.01)


def test_one_fsdp_rank_of_two(tmp_path):
    """--parallel fsdp: rank 0 holds half of every weight, LoRA parameter and AdamW state (FSDP2
    shards dim 0 as torch.chunk does), on a fake process group that gathers and frees as the real
    one. A real gloo run's peak moves from run to run on the CPU (10.8 to 14.1 MB here, gloo's
    threads freeing buffers when they finish), so it bounds the estimate from below only: the
    fewest bytes a run held is at least what the estimate counts, to 2%."""
    cfg = settings(**RANKS, parallel="fsdp")
    config = LlamaConfig(**TINY)
    with one_thread():
        one = training.estimate.estimate_step(cfg, config, "cpu", torch.bfloat16)
        two = training.estimate.estimate_step(replace(cfg, estimate_world_size=2), config, "cpu", torch.bfloat16)
    for category in (memory_estimate.WEIGHTS, memory_estimate.LORA, memory_estimate.OPTIMIZER):
        assert two.categories[category] == pytest.approx(one.categories[category] / 2, rel=0.01), category
    assert two.peak_bytes <= torchrun_rank_peak(tmp_path, "fsdp") * 1.02


RANKS = dict(micro_batch_size=2, max_seq_len=128, lora_r=8, grad_accum=2, precision="bf16", grad_checkpointing=True,
             lora_dropout=0.0)


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torchrun_rank_peak(tmp_path, parallel: str) -> int:
    """Rank 0's allocator peak of a real two-rank run (tests/fsdp_memory_rank.py)."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    kw = dict(RANKS, device="cpu", parallel=parallel)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "fsdp_memory_rank.py"), json.dumps(kw), json.dumps(TINY), str(tmp_path / "peak")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
    assert result.returncode == 0, result.stderr[-3000:]
    return int((tmp_path / "peak").read_text())


def test_smollm2_shapes(smollm2_dir):
    """The demo model's shapes (30 layers, 49152 tokens), at a short length to stay quick."""
    cfg = settings(micro_batch_size=1, max_seq_len=64, lora_dropout=0.0, grad_accum=1)
    config = LlamaConfig.from_file(smollm2_dir / "config.json")
    est = training.estimate.estimate_step(cfg, config, "cpu", torch.float32)
    assert est.peak_bytes == pytest.approx(allocator_peak(cfg, config), rel=0.01)


def test_config_alone_and_the_json(tmp_path, capsys):
    """A directory with config.json only (no weights, no tokenizer) is enough; --json prints one
    object; --device cuda models a CUDA run here (each allocation rounded to 512 bytes, the
    uncounted parts on lines of their own); a budget finds the largest batch and length that fit,
    each checked by a count of its own."""
    only = tmp_path / "config-only"
    only.mkdir()
    (only / "config.json").write_text(json.dumps({**TINY, "architectures": ["LlamaForCausalLM"]}))
    flags = ["--estimate-memory", "--model", str(only), "--micro-batch-size", "2", "--max-seq-len", "128",
             "--precision", "fp32", "--json"]
    assert train.main(flags + ["--device", "cpu"]) is None
    cpu = json.loads(capsys.readouterr().out)
    assert cpu["not_counted"] == {} and cpu["total_bytes"] == cpu["peak_bytes"]
    assert sum(cpu["categories"].values()) == cpu["peak_bytes"]
    assert set(cpu["categories"]) >= {memory_estimate.WEIGHTS, memory_estimate.LORA, memory_estimate.GRADS,
                                      memory_estimate.OPTIMIZER, memory_estimate.SAVED}
    train.main(flags + ["--device", "cuda", "--memory-budget", "600MiB"])
    cuda = json.loads(capsys.readouterr().out)
    assert cuda["peak_bytes"] >= cpu["peak_bytes"] and cuda["not_counted"]
    assert cuda["total_bytes"] == cuda["peak_bytes"] + sum(cuda["not_counted"].values())
    config = LlamaConfig.from_file(only / "config.json")
    cfg = training.flags.parse_config(flags + ["--device", "cuda"])
    total = lambda **kw: training.estimate.estimate_step(replace(cfg, **kw), config, "cuda", torch.float32).total_bytes
    b, t = cuda["max_micro_batch_size"], cuda["max_seq_len"]
    assert total(micro_batch_size=b) <= 600 * 2**20 < total(micro_batch_size=b + 1)
    assert total(max_seq_len=t) <= 600 * 2**20 < total(max_seq_len=t + 1)
    assert cuda["fits"] == (cuda["total_bytes"] <= 600 * 2**20)


def test_the_embedding_table_on_the_host_leaves_the_device():
    """--offload-embeddings: the table is host memory (all of the host's peak here) and no longer a
    frozen weight on the device; the device peak drops by it, less the rows each batch now brings
    (two micro-batches' of them alive)."""
    cfg, config = settings(grad_checkpointing=True, lora_dropout=0.0), LlamaConfig(**{**TINY, "tie_word_embeddings": False})
    plain = training.estimate.estimate_step(cfg, config, "cpu", torch.float32)
    est = training.estimate.estimate_step(replace(cfg, offload_embeddings=True), config, "cpu", torch.float32)
    table, rows = config.vocab_size * config.hidden_size * 4, cfg.micro_batch_size * cfg.max_seq_len * config.hidden_size * 4
    assert est.host_peak_bytes == table and plain.host_peak_bytes == 0
    assert est.weights_by_kind["float32"] == plain.weights_by_kind["float32"] - table
    assert table - 2 * rows <= plain.peak_bytes - est.peak_bytes <= table


def test_the_json_keeps_the_host_apart(tmp_path, capsys, monkeypatch):
    """--offload-activations: --json's peak_bytes is the device's, host_peak_bytes the host's; the
    budget's longest --max-seq-len is found with the flag on: there the plain step would not fit."""
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    only = tmp_path / "config-only"
    only.mkdir()
    (only / "config.json").write_text(json.dumps({**TINY, "num_hidden_layers": 4, "max_position_embeddings": 512,
                                                  "architectures": ["LlamaForCausalLM"]}))
    flags = ["--estimate-memory", "--model", str(only), "--micro-batch-size", "2", "--max-seq-len", "128",
             "--precision", "fp32", "--device", "cpu", "--grad-checkpointing", "--json"]
    train.main(flags)
    plain = json.loads(capsys.readouterr().out)
    train.main(flags + ["--offload-activations", "--memory-budget", str(plain["peak_bytes"])])
    both = json.loads(capsys.readouterr().out)
    assert plain["host_peak_bytes"] == 0 < both["host_peak_bytes"] and both["peak_bytes"] < plain["peak_bytes"]
    cfg = training.flags.parse_config(flags)
    longest = both["max_seq_len"]
    assert longest > 128  # (the plain step fits 128 exactly: the budget is its peak)
    config = LlamaConfig.from_file(only / "config.json")
    plain_there = training.estimate.estimate_step(replace(cfg, max_seq_len=longest), config, "cpu", torch.float32)
    assert plain_there.total_bytes > plain["peak_bytes"]


@pytest.mark.parametrize("flags, message", [
    (["--memory-budget=-3GiB"], "--memory-budget -3GiB: not a size"),
    (["--memory-budget", "lots"], "--memory-budget lots: not a size"),
    (["--json"], "--json is for --estimate-memory"),
    (["--estimate-memory", "--resume"], "drop --resume"),
    (["--estimate-world-size", "2"], "--estimate-world-size is for --estimate-memory"),
    (["--estimate-memory", "--estimate-world-size", "0"], "--estimate-world-size 0: must be in [1, inf)"),
])
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(flags if "--estimate-memory" in flags or "--json" in flags or "--estimate-world-size" in flags
                   else ["--estimate-memory", *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
