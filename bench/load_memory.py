"""Peak memory of loading a model: bf16, QLoRA quantized after the load, QLoRA quantized while
loading, and FSDP2 over 2 and 4 ranks (per rank).

    python bench/load_memory.py                      # random weights in Llama-3.2-1B's shape, CPU
    python bench/load_memory.py --case llama-3.1-8b --device cuda

The checkpoint (random weights in a public model's shape, bf16 safetensors) is written once under
--scratch. Each way of loading runs in its own process, so its peak is its own: on the CPU the
process's peak resident set (VmHWM) minus what it held before loading (torch and bitsandbytes
imported), on CUDA torch.cuda.max_memory_allocated. "nf4 after load" is load_model, then
inject_lora(quantize="nf4"): the whole bf16 model exists first. "nf4 while loading" is
load_model(replace_linear=nf4_loader): each linear is quantized as it is read. "fsdp N ranks" is
what train.py --parallel fsdp does under torchrun (gloo on the CPU, nccl on CUDA): meta_model, LoRA,
parallel.wrap, which shards the model and has each rank read its own rows; the figure is the
largest rank's peak.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("bf16", "nf4 after load", "nf4 while loading", "fsdp 2 ranks", "fsdp 4 ranks")

CHILD = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
import lora, lora.quant
from bench.load_memory import rss_mib
from model import load_model
mode, path, device = {mode!r}, {path!r}, {device!r}
before = rss_mib("VmRSS")
replace = lora.quant.nf4_loader(torch.bfloat16) if mode == "nf4 while loading" else None
model = load_model(path, torch.bfloat16, device=device, replace_linear=replace)
if mode != "bf16":
    lora.inject_lora(model, lora.LoRAConfig(r=16, alpha=32), quantize="nf4", compute_dtype=torch.bfloat16)
peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else rss_mib("VmHWM") - before
print(json.dumps({{"peak_mib": peak}}))
"""

FSDP_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
import lora, parallel
from bench.load_memory import rss_mib
from model.load import meta_model
from model.loss import LanguageModelLoss
path, device = {path!r}, {device!r}
parallel.init(device, 600)
before = rss_mib("VmRSS")
model = meta_model(path, torch.bfloat16)
lora.inject_lora(model, lora.LoRAConfig(r=16, alpha=32))
parallel.wrap(LanguageModelLoss(model), "fsdp", device)
peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else rss_mib("VmHWM") - before
print(json.dumps({{"rank": parallel.rank(), "peak_mib": peak}}), flush=True)
parallel.shutdown()
"""


def peak_of(mode: str, path: Path, device: str, scratch: Path) -> float:
    """The peak of one way of loading, in its own process(es); for FSDP the largest rank's."""
    if not mode.startswith("fsdp"):
        code = CHILD.format(root=str(ROOT), mode=mode, path=str(path), device=device)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    script = scratch / "fsdp_load.py"
    script.write_text(FSDP_CHILD.format(root=str(ROOT), path=str(path), device=device))
    ranks = mode.split()[1]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          ranks, str(script)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == int(ranks), out.stdout + out.stderr
    return max(r["peak_mib"] for r in rows)


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_checkpoint(case: str, scratch: Path) -> Path:
    """Random weights in `case`'s shape (bench/train_speed.py's random_weights, made on the CPU in
    bf16) as a safetensors checkpoint, written once under `scratch`: a shard per decoder layer, so
    that no more than one layer is in memory while it is written."""
    from safetensors.torch import save_file

    from bench.train_speed import SHAPES, case_config, random_weights
    path = scratch / case
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = case_config({"model": case})
    shard, group, weight_map = {}, None, {}
    for key, t in random_weights(config, torch.bfloat16, "cpu"):
        key_group = key.split(".")[2] if key.startswith("model.layers.") else key  # a layer's index
        if shard and key_group != group:  # the previous layer is complete: write it, drop it
            save_file(shard, tmp / f"model-{len(set(weight_map.values())):05d}.safetensors", metadata={"format": "pt"})
            shard = {}
        name = f"model-{len(set(weight_map.values())) + (not shard):05d}.safetensors"
        shard[key], weight_map[key], group = t, name, key_group
    save_file(shard, tmp / f"model-{len(set(weight_map.values())):05d}.safetensors", metadata={"format": "pt"})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **SHAPES[case]}))
    tmp.rename(path)
    return path


def main():
    from bench.train_speed import SHAPES
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", default="llama-3.2-1b", choices=list(SHAPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--scratch", type=Path, default=Path.home() / ".cache" / "nanolora" / "bench")
    args = p.parse_args()
    path = write_checkpoint(args.case, args.scratch)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    print(f"{args.case}: {size:,.0f} MiB of bf16 safetensors in {path}")
    print(f"| load ({args.device}) | peak MiB | x bf16 file |\n|---|---|---|")
    for mode in MODES:
        peak = peak_of(mode, path, args.device, args.scratch)
        print(f"| {mode} | {peak:,.0f} | {peak / size:.2f} |", flush=True)


if __name__ == "__main__":
    main()
