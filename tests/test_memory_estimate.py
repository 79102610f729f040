"""train.py --estimate-memory: the step run on fake tensors counts what the real step allocates.

The independent measure is the CPU allocator's own record: torch.profiler with profile_memory=True
logs every allocation and free of the real step (random weights of the same shapes, the same
worst batch, the run's own accumulate and update), and the running sum of those events, over the
bytes alive before it (weights, LoRA, batch), peaks where the step's memory peaks. The estimate
reads no weight and runs no kernel; its peak must land within 1% of that one.
"""

import json
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import dpo
import lora
import memory_estimate
import train
from model import Llama, LlamaConfig
from model.loss import LanguageModelLoss
from settings import TrainConfig

TINY = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)  # widths NF4 takes on the CPU (multiples of 64)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def settings(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(micro_batch_size=2, max_seq_len=128, lora_r=8, grad_accum=2, precision="fp32",
                                 device="cpu"), **kw})


def allocator_peak(cfg: TrainConfig, config: LlamaConfig) -> int:
    """The real step's peak on the CPU: the bytes alive before it (its tensors' storages, counted
    once) plus the highest running sum of the allocator's events during two steps."""
    dtype = DTYPES[cfg.precision]
    torch.manual_seed(0)
    model = Llama(config).to(dtype)
    model.rope_inv_freq = model.rope_inv_freq.float()
    lora.inject_lora(model, train.lora_config(cfg), quantize=cfg.quantize, compute_dtype=dtype)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.grad_checkpointing = cfg.grad_checkpointing
    model.train()
    loss_fn = (dpo.PreferenceLoss(model, cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_loss, cfg.dpo_rpo_alpha)
               if cfg.objective == "dpo" else LanguageModelLoss(model))
    batches = [train.worst_batch(cfg) for _ in range(min(cfg.grad_accum, 2))]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scaler = train.build_optimizer(cfg, model, "cpu", torch.float32)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    held = [t for m in model.modules() for t in memory_estimate.module_tensors(m)]
    held += [v for b in batches for v in b.values() if isinstance(v, torch.Tensor)]
    before = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            train.accumulate(loss_fn, batches, scaler, autocast, sum(b["n_loss"] for b in batches), loss_fn.STATS)
            train.update(optimizer, scaler, params, cfg.max_grad_norm)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, n in events:
        now += n
        peak = max(peak, now)
    return before + peak


CASES = {
    "fp32": dict(),
    "fp32, no dropout": dict(lora_dropout=0.0),
    "fp32, checkpointing": dict(grad_checkpointing=True, lora_dropout=0.0),
    "bf16, checkpointing": dict(precision="bf16", grad_checkpointing=True, lora_dropout=0.0, grad_accum=1),
    "NF4 fp32": dict(quantize="nf4", lora_dropout=0.0, grad_accum=1),
    "packed": dict(pack=True),
    "DoRA": dict(dora=True),
    "DPO": dict(objective="dpo"),
    "DPO, reference precomputed": dict(objective="dpo", dpo_precompute_ref=True),
}


@pytest.mark.parametrize("case", CASES)
def test_the_estimate_is_the_allocators_peak(case):
    """Within 1%: the allocator's peak holds a few buffers no op returns (a kernel's scratch), which
    the count cannot see; anything larger is a tensor counted wrongly or at the wrong time."""
    cfg = settings(**CASES[case])
    config = LlamaConfig(**TINY)
    est = train.estimate_step(cfg, config, "cpu", DTYPES[cfg.precision])
    assert est.peak_bytes == pytest.approx(allocator_peak(cfg, config), rel=0.01)
    assert sum(est.categories.values()) == est.peak_bytes
    assert est.categories[memory_estimate.WEIGHTS] == sum(est.weights_by_kind.values())


GAPS = {  # bf16 without checkpointing counts 256 KiB (2.6%) less than the allocator saw, on this CPU
    "bf16": dict(precision="bf16", grad_accum=1),
    "bf16, two micro-batches": dict(precision="bf16"),
    "NF4 bf16": dict(quantize="nf4", precision="bf16", grad_accum=1, lora_dropout=0.0),
    "fp32, checkpointing with dropout": dict(grad_checkpointing=True),
}


@pytest.mark.parametrize("case", GAPS)
@pytest.mark.xfail(strict=True, reason="known gap: the count and the allocator part by 2 to 3% here (issue 35 open)")
def test_known_gaps(case):
    """Where the count is not yet the allocator's: strict, so that a fix shows as a pass to record."""
    cfg = settings(**GAPS[case])
    config = LlamaConfig(**TINY)
    est = train.estimate_step(cfg, config, "cpu", DTYPES[cfg.precision])
    assert est.peak_bytes == pytest.approx(allocator_peak(cfg, config), rel=0.01)


def test_smollm2_shapes(smollm2_dir):
    """The demo model's shapes (30 layers, 49152 tokens), at a short length to stay quick."""
    cfg = settings(micro_batch_size=1, max_seq_len=64, lora_dropout=0.0, grad_accum=1)
    config = LlamaConfig.from_file(smollm2_dir / "config.json")
    est = train.estimate_step(cfg, config, "cpu", torch.float32)
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
    cfg = train.parse_config(flags + ["--device", "cuda"])
    total = lambda **kw: train.estimate_step(replace(cfg, **kw), config, "cuda", torch.float32).total_bytes
    b, t = cuda["max_micro_batch_size"], cuda["max_seq_len"]
    assert total(micro_batch_size=b) <= 600 * 2**20 < total(micro_batch_size=b + 1)
    assert total(max_seq_len=t) <= 600 * 2**20 < total(max_seq_len=t + 1)
    assert cuda["fits"] == (cuda["total_bytes"] <= 600 * 2**20)


@pytest.mark.parametrize("flags, message", [
    (["--memory-budget=-3GiB"], "--memory-budget -3GiB: not a size"),
    (["--memory-budget", "lots"], "--memory-budget lots: not a size"),
    (["--json"], "--json is for --estimate-memory"),
    (["--estimate-memory", "--resume"], "drop --resume"),
])
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(flags if "--estimate-memory" in flags or "--json" in flags else ["--estimate-memory", *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
