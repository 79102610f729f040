"""Run by test_memory_estimate.py under torchrun (2 ranks, gloo): the real step of one rank under
FSDP2 or DDP, measured by the CPU allocator (tests/allocator.py; DDP wraps inside the measured
span, so that its Reducer's gradient buckets count). argv: the settings as JSON, the model's
config as JSON, the file rank 0 writes its peak to.

The model is built on meta with LoRA, sharded as train.py shards it (parallel.shard, then storage
for each shard and random values in place of the checkpoint's), or wrapped in DDP; then two steps
of train.accumulate and train.update on the worst batch, per rank."""

import json
import sys
from contextlib import nullcontext

import torch

import lora
import memory_estimate
import parallel
import train
from allocator import peak_of
from model import Llama, LlamaConfig
from model.llama import rope_frequencies
from model.loss import LanguageModelLoss
from settings import TrainConfig



cfg = TrainConfig(**json.loads(sys.argv[1]))
config = LlamaConfig(**json.loads(sys.argv[2]))
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.precision]
parallel.init("cpu", 120)
torch.manual_seed(0)
with torch.device("meta"):
    model = Llama(config)
model = model.to(dtype)
lora.inject_lora(model, train.lora_config(cfg), compute_dtype=dtype)
for p in model.parameters():
    if p.requires_grad:
        p.data = p.data.float()
loss_fn = LanguageModelLoss(model)
if cfg.parallel == "fsdp":
    parallel.shard(model)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.rope_inv_freq = rope_frequencies(config)
    for p in model.parameters():
        with torch.no_grad():
            getattr(p, "_local_tensor", p).normal_(0, 0.02)
    step_fn = loss_fn
else:
    model.to_empty(device="cpu")
    model.tie_weights()
    model.rope_inv_freq = rope_frequencies(config)
    for p in model.parameters():
        with torch.no_grad():
            p.normal_(0, 0.02)
    step_fn = None  # wrapped in DDP inside the measured span: its Reducer's buckets are part of the step
model.grad_checkpointing = cfg.grad_checkpointing
model.train()
batches = [train.worst_batch(cfg) for _ in range(min(cfg.grad_accum, 2))]
params = [p for p in model.parameters() if p.requires_grad]
optimizer, scaler = train.build_optimizer(cfg, model, "cpu", torch.float32)
autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
held = [t for m in model.modules() for t in memory_estimate.module_tensors(m)]
held += [v for b in batches for v in b.values() if isinstance(v, torch.Tensor)]


def steps():
    global step_fn
    step_fn = step_fn or parallel.wrap(loss_fn, "ddp", "cpu")
    n_loss = parallel.all_reduce_sum(sum(b["n_loss"] for b in batches))[0]
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        train.accumulate(step_fn, batches, scaler, autocast, n_loss, loss_fn.STATS)
        train.update(optimizer, scaler, params, cfg.max_grad_norm)


peak = peak_of(steps, held)
if parallel.is_main():
    with open(sys.argv[3], "w") as f:
        f.write(str(peak))
parallel.shutdown()
