"""Run by test_memory_estimate.py under torchrun (2 ranks, gloo): the real step of one rank under
FSDP2 or DDP, measured by the CPU allocator (tests/allocator.py; DDP wraps inside the measured
span, so that its Reducer's gradient buckets count). argv: the settings as JSON, the model's
config as JSON, the file rank 0 writes its peak to.

The model is built on meta with LoRA, sharded as train.py shards it (parallel.shard, then storage
for each shard and random values in place of the checkpoint's), or wrapped in DDP; then two steps
of training.step.accumulate and training.step.update on the worst batch, per rank."""

import json
import sys

import torch

import lora
from training import parallel
import training.phases, training.step
from allocator import step_peak
from model import Llama, LlamaConfig
from model.llama import rope_frequencies
from model.loss import LanguageModelLoss
from training.settings import TrainConfig

cfg = TrainConfig(**json.loads(sys.argv[1]))
config = LlamaConfig(**json.loads(sys.argv[2]))
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.precision]
parallel.init("cpu", 120)
torch.manual_seed(0)
with torch.device("meta"):
    model = Llama(config, grad_checkpointing=cfg.grad_checkpointing)
model = model.to(dtype)
lora.inject_lora(model, training.phases.lora_config(cfg), compute_dtype=dtype)
for p in model.parameters():
    if p.requires_grad:
        p.data = p.data.float()
loss_fn = LanguageModelLoss(model)
if cfg.parallel == "fsdp":
    parallel.shard(model)  # each parameter now its shard, still on meta
model.to_empty(device="cpu")
model.tie_weights()
model.rope_inv_freq = rope_frequencies(config)
with torch.no_grad():
    for p in model.parameters():
        getattr(p, "_local_tensor", p).normal_(0, 0.02)  # (values: any finite)
wrap = (lambda: parallel.wrap(loss_fn, "ddp", "cpu")) if cfg.parallel == "ddp" else None
peak = step_peak(cfg, model, loss_fn, dtype, wrap)
if parallel.is_main():
    with open(sys.argv[3], "w") as f:
        f.write(str(peak))
parallel.shutdown()
