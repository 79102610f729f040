"""Run by test_parallel.py under torchrun (2 ranks, gloo): FSDP2 loading from the meta device.

Each rank builds the model on meta, injects LoRA, shards it (parallel.wrap), which reads this rank's
rows of each tensor from the checkpoint. It then writes, as JSON to argv[2].rank<N>: the largest
difference of every whole parameter (gathered) from a single-process load_model + inject_lora with
the same seed, and the rows of each tensor it read from the files.
"""

import json
import sys

import torch

import lora
from training import parallel
from model import load_model
from model.load import meta_model
from model.loss import LanguageModelLoss

path, out = sys.argv[1], sys.argv[2]
parallel.init("cpu", 120)
cfg = lora.LoRAConfig(r=3, alpha=6, targets="all-linear")
reads = {}
read_tensor = parallel.read_tensor


def recording(f, key, rows=None):
    t = read_tensor(f, key, rows)
    reads[key] = [list(rows) if rows else None, list(t.shape)]
    return t


parallel.read_tensor = recording
torch.manual_seed(0)
model = meta_model(path)
lora.inject_lora(model, cfg)
parallel.wrap(LanguageModelLoss(model), "fsdp", "cpu")
torch.manual_seed(0)
reference = load_model(path)
lora.inject_lora(reference, cfg)
expected = dict(reference.named_parameters())
diffs = {k: (parallel.full(p.detach()) - expected[k]).abs().max().item() for k, p in model.named_parameters()}
with open(f"{out}.rank{parallel.rank()}", "w") as f:
    json.dump({"diffs": diffs, "reads": reads, "tied": model.lm_head.weight is model.model.embed_tokens.weight,
               "lora_A_sum": sum(m.lora_A.weight.detach().abs().sum().item()
                                 for m in lora.lora_modules(model).values())}, f)
parallel.shutdown()
