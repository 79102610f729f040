"""LoRA training speed and memory: nanolora against transformers+PEFT, in one invocation.

    python bench/train_speed.py                 # CPU: SmolLM2-135M, LoRA r=16 all-linear, fp32, 4 x 256
                                                # (LoRA dropout 0, then 0.05)
    python bench/train_speed.py --case llama-3.2-1b   # GPU cases: random weights in real shapes
    python bench/train_speed.py --case llama-3.2-1b-dry   # a GPU case's code path, tiny, on the CPU

The GPU cases build both models on the device in their dtype from the same random weights
(`random_weights`): no checkpoint is written and no full-precision copy exists. Each (case,
implementation) runs in its own subprocess, so peak memory (CUDA max_memory_allocated and
max_memory_reserved, or peak RSS on the CPU) belongs to that implementation alone. Both run the same steps: same model
shape and weights, same random token batches, same LoRA settings and AdamW; warm-up steps are
excluded from the timing, and a run's speed comes from its median step. With --rounds N the
implementations take turns N times; each ratio to peft is taken within a round, then the median.

MFU counts model FLOPs of one LoRA step over the device's measured peak (a large matmul in the
run's dtype, timed by every run after its steps; the best sample counts):
    frozen base linears: forward 2*P*n, backward 2*P*n (input gradients only, no weight gradients)
    LoRA A and B:        6*P_lora*n (forward, input and weight gradients)
    attention scores:    forward 4*L*B*T^2*H*D (QK^T and AV, causal half not discounted),
                         backward twice that
with n = tokens in the step, P = parameters of the base linears including lm_head.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.errors import at_least  # noqa: E402
from model.runtime import DTYPES, peak_memory_gib, peak_reserved_gib, reset_peak_memory  # noqa: E402

# Real shapes of public checkpoints (config.json fields); weights are random.
SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                         max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "deepseek-llm-7b": dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                            num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                            max_position_embeddings=4096),
}
CASES = {
    "cpu-smollm2": dict(model="demo", batch=4, seq=256, dtype="fp32", quantize=None, ckpt=False, device="cpu"),
    # The same with train.py's default LoRA dropout (0.05), as fine-tuning walkthroughs use it.
    "cpu-smollm2-dropout": dict(model="demo", batch=4, seq=256, dtype="fp32", quantize=None, ckpt=False,
                                device="cpu", dropout=0.05),
    # bf16 on the CPU (autocast, LoRA A and B fp32): reported, no target; GPUs are where bf16 pays.
    "cpu-smollm2-bf16": dict(model="demo", batch=4, seq=256, dtype="bf16", quantize=None, ckpt=False, device="cpu"),
    "llama-3.2-1b": dict(model="llama-3.2-1b", batch=4, seq=2048, dtype="bf16", quantize=None, ckpt=False, device="cuda"),
    "llama-3.1-8b-qlora": dict(model="llama-3.1-8b", batch=2, seq=2048, dtype="bf16", quantize="nf4", ckpt=True, device="cuda"),
    "deepseek-llm-7b": dict(model="deepseek-llm-7b", batch=2, seq=1024, dtype="bf16", quantize=None, ckpt=True, device="cuda"),
    # What --offload-activations and --tile-mlp cost (nanolora only: peft has neither).
    "llama-3.1-8b-qlora-offload": dict(model="llama-3.1-8b", batch=2, seq=2048, dtype="bf16", quantize="nf4", ckpt=True,
                                       device="cuda", offload=True),
    "llama-3.1-8b-qlora-tiled": dict(model="llama-3.1-8b", batch=2, seq=2048, dtype="bf16", quantize="nf4", ckpt=True,
                                     device="cuda", tile_mlp=8),
    "cpu-smollm2-ckpt": dict(model="demo", batch=4, seq=256, dtype="fp32", quantize=None, ckpt=True, device="cpu"),
    "cpu-smollm2-offload": dict(model="demo", batch=4, seq=256, dtype="fp32", quantize=None, ckpt=True, device="cpu",
                                offload=True),
    "cpu-smollm2-tiled": dict(model="demo", batch=4, seq=256, dtype="fp32", quantize=None, ckpt=True, device="cpu",
                              tile_mlp=4),
}
# Each GPU case's code path on the CPU at a tiny shape (bench/gpu_check.py --dry-run runs them).
SHAPES["tiny"] = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
for _name in [n for n, c in CASES.items() if c["device"] == "cuda"]:
    CASES[_name + "-dry"] = {**CASES[_name], "model": "tiny", "batch": 2, "seq": 64, "device": "cpu",
                             "dtype": "fp32"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_weights(config, dtype: torch.dtype, device):
    """(key, tensor) for every checkpoint key of a `config`-shaped Llama, made on `device` in `dtype`:
    N(0, 0.02) matrices, unit norms. Each tensor is drawn from its own seed (crc32 of its key), so
    both implementations get the same weights, in whatever order they ask, with no checkpoint on
    disk (an 8B model is 16 GB of bf16) and no full-precision copy (32 GB in fp32 for 8B)."""
    from model import Llama
    from model.files import expected_shapes
    with torch.device("meta"):
        shapes = expected_shapes(Llama(config))
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            yield key, torch.ones(shape, dtype=dtype, device=device)
            continue
        g = torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))
        yield key, torch.randn(shape, generator=g, dtype=dtype, device=device).mul_(0.02)


def case_config(case: dict):
    """nanolora's LlamaConfig of a real-shape case (the public checkpoint's config.json fields)."""
    from model import LlamaConfig
    return LlamaConfig.from_hf({"architectures": ["LlamaForCausalLM"], **SHAPES[case["model"]]}, source=case["model"])


def model_config(case: dict):
    """The LlamaConfig of a case: the demo model's, or the real shape's."""
    if case["model"] != "demo":
        return case_config(case)
    from model import LlamaConfig, resolve_model_dir
    return LlamaConfig.from_file(resolve_model_dir("demo") / "config.json")


def batches(vocab: int, case: dict, n: int, device):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(0, vocab, (case["batch"], case["seq"]), generator=g)
        yield ids.to(device)


def nanolora_step_fn(case: dict, compile: bool = False):
    import lora
    from model import Llama, load_model, resolve_model_dir
    from model.load import fill_model
    from model.loss import lm_loss_sum
    from model.runtime import keep_freed_memory
    device, dtype = case["device"], DTYPES[case["dtype"]]
    if device == "cpu":
        keep_freed_memory()  # as train.py does on the CPU
    replace_linear = None
    if case["quantize"]:  # as train.py: each linear quantized as it is read
        from lora.quant import nf4_loader
        replace_linear = nf4_loader(dtype)
    options = dict(grad_checkpointing=case["ckpt"], offload_activations=case.get("offload", False),
                   tile_mlp=case.get("tile_mlp", 1))
    if case["model"] == "demo":
        model = load_model(resolve_model_dir("demo"), dtype=dtype, device=device, replace_linear=replace_linear,
                           **options)
    else:  # built on the device in its dtype, from random weights (no checkpoint)
        config = case_config(case)
        with torch.device("meta"):
            model = Llama(config, **options).to(dtype)
        model = fill_model(model, random_weights(config, dtype, device), device, replace_linear)
    lora_cfg = lora.LoRAConfig(r=16, alpha=32, dropout=case.get("dropout", 0.0), targets="all-linear")
    lora.inject_lora(model, lora_cfg, quantize=case["quantize"], compute_dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if compile:  # what train.py --compile does: each decoder block on its own
        for layer in model.model.layers:
            layer.compile()
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as train.py, and as Trainer does
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def step(ids):
        with autocast:
            loss, n = lm_loss_sum(model, ids, ids)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.config.vocab_size, step


def peft_step_fn(case: dict):
    import peft
    import transformers
    device, dtype = case["device"], DTYPES[case["dtype"]]
    if case["model"] == "demo":
        kw = {}
        if case["quantize"]:
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
        from model import resolve_model_dir
        model = transformers.AutoModelForCausalLM.from_pretrained(
            resolve_model_dir("demo"), dtype=dtype, attn_implementation="sdpa", device_map=device, **kw)
    else:
        model = hf_random_model(case, dtype, device)
    if case["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=case.get("dropout", 0.0),
                                                       target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as train.py, and as Trainer does
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def step(ids):
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.config.vocab_size, step


def hf_random_model(case: dict, dtype: torch.dtype, device: str):
    """transformers' LlamaForCausalLM of a real-shape case, built on the device in `dtype` with
    random_weights (the same as nanolora's); QLoRA: every decoder linear then swapped for
    bitsandbytes' Linear4bit, NF4 with double quantization, as from_pretrained with
    BitsAndBytesConfig(load_in_4bit, nf4, double quant) would hold it."""
    import transformers
    cfg = transformers.LlamaConfig(**SHAPES[case["model"]], attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters created in dtype (the RoPE buffer stays fp32)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    params = model.state_dict()
    with torch.no_grad():
        for key, t in random_weights(case_config(case), dtype, device):
            params[key].copy_(t)
    if case["quantize"]:
        import bitsandbytes as bnb
        for name, linear in list(model.model.layers.named_modules()):
            if isinstance(linear, torch.nn.Linear):
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                      device=device)
                q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to(device)  # quantized here
                parent, attr = name.rpartition(".")[::2]
                setattr(model.model.layers.get_submodule(parent), attr, q)
        model.is_loaded_in_4bit = True  # what from_pretrained sets: PEFT then wraps with its bnb LoRA layer
    if device == "cuda":
        torch.cuda.empty_cache()  # the replaced bf16 linears' blocks: not part of the step's memory
    return model


def step_flops(config, case: dict) -> float:
    c = config
    B, T, L = case["batch"], case["seq"], c.num_hidden_layers
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = [(c.hidden_size, q), (c.hidden_size, kv), (c.hidden_size, kv), (q, c.hidden_size),
              (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
              (c.intermediate_size, c.hidden_size)]
    base = L * sum(i * o for i, o in shapes) + c.hidden_size * c.vocab_size
    lora_params = L * sum(16 * (i + o) for i, o in shapes)
    n = B * T
    attention = 4 * L * B * T * T * c.num_attention_heads * c.head_dim
    return 4 * base * n + 6 * lora_params * n + 3 * attention


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the device's practical peak in this dtype."""
    n = 4096 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps = 50 if device == "cuda" else 10
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(impl: str, case_name: str, steps: int, warmup: int) -> dict:
    """Run one implementation on one case in this process; return its figures.

    Speed comes from the median step time, not the mean: on a shared machine a slow spell of a few
    seconds would otherwise move the figure. The matmul peak is sampled here too, after the steps,
    so that the run's MFU can be set against the best peak seen over the whole bench.
    """
    case = CASES[case_name]
    torch.manual_seed(0)
    if impl == "peft":
        vocab, step = peft_step_fn(case)
    else:
        vocab, step = nanolora_step_fn(case, compile=impl == "nanolora-compile")
    data = list(batches(vocab, case, warmup + steps, case["device"]))
    for ids in data[:warmup]:
        step(ids)
    sync(case["device"])
    reset_peak_memory()  # the peak of the timed steps, not of loading
    step_seconds = []
    for ids in data[warmup:]:
        t = time.perf_counter()
        step(ids)
        sync(case["device"])
        step_seconds.append(time.perf_counter() - t)
    seconds = statistics.median(step_seconds)
    return {"tokens_per_s": case["batch"] * case["seq"] / seconds, "peak_gib": peak_memory_gib(),
            "reserved_gib": peak_reserved_gib(), "flops": step_flops(model_config(case), case) / seconds,
            "matmul_peak": matmul_peak(case["device"], DTYPES[case["dtype"]])}


def run_case(case_name: str, impls: list[str], steps: int, warmup: int, rounds: int) -> dict:
    """Each implementation `rounds` times, taking turns: {impl: [figures of round 1, round 2, ...]}.

    Taking turns spreads slow spells of a shared machine over all implementations alike, and lets
    each round compare implementations that ran minutes apart.
    """
    runs = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            cmd = [sys.executable, __file__, "--one", impl, "--case", case_name, "--steps", str(steps),
                   "--warmup", str(warmup)]
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"{impl} on {case_name} failed:\n{out.stderr[-3000:]}")
            runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def summarize(runs: dict, peak: float) -> dict:
    """Table figures of one case from its rounds: medians, with each ratio to peft taken within a
    round (the paired runs) before the median over rounds; MFU against `peak` FLOP/s."""
    peer = runs["peft"]
    rows = {}
    for impl, rs in runs.items():
        rows[impl] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "speed_ratio": statistics.median(r["tokens_per_s"] / p["tokens_per_s"] for r, p in zip(rs, peer)),
            "peak_gib": statistics.median(r["peak_gib"] for r in rs),
            "reserved_gib": statistics.median(r["reserved_gib"] for r in rs),
            "memory_ratio": statistics.median(r["peak_gib"] / p["peak_gib"] for r, p in zip(rs, peer)),
            "mfu": statistics.median(r["flops"] for r in rs) / peak,
        }
    return rows


def print_table(rows: dict):
    from rich.console import Console
    from rich.table import Table
    table = Table(title="LoRA training steps: nanolora vs transformers+PEFT (SDPA)")
    for col in ("case", "implementation", "tokens/s", "speed vs peft", "peak GiB", "reserved GiB", "memory vs peft",
                "MFU"):
        table.add_column(col, justify="right")
    for name, results in rows.items():
        for impl, r in results.items():
            table.add_row(name, impl, f"{r['tokens_per_s']:.0f}", f"{r['speed_ratio']:.2f}x",
                          f"{r['peak_gib']:.2f}", f"{r['reserved_gib']:.2f}", f"{r['memory_ratio']:.2f}x",
                          f"{100 * r['mfu']:.1f}%")
        table.add_section()
    Console(width=120).print(table)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", action="append", choices=list(CASES),
                   help="default: the CPU case, plus the GPU cases when CUDA is available")
    p.add_argument("--steps", type=at_least(1), default=6)
    p.add_argument("--rounds", type=at_least(1), default=1,
                   help="run each implementation this many times, taking turns, and report the medians")
    p.add_argument("--warmup", type=at_least(0), default=8,
                   help="untimed steps first: allocators and caches settle (transformers takes ~8 on the CPU)")
    p.add_argument("--compile", action="store_true", help="also run nanolora with --compile")
    p.add_argument("--one", choices=("nanolora", "nanolora-compile", "peft"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.case[0], args.steps, args.warmup)))
        return
    cases = args.case or [c for c in CASES if CASES[c]["device"] == "cpu" or torch.cuda.is_available()]
    impls = ["nanolora"] + ["nanolora-compile"] * args.compile + ["peft"]
    runs = {name: run_case(name, impls, args.steps, args.warmup, args.rounds) for name in cases}
    # The device's peak in a dtype: the best of the samples every run took, so that a run sampling
    # it in a slow spell cannot inflate MFU.
    peaks = {}
    for name, by_impl in runs.items():
        key = CASES[name]["device"], CASES[name]["dtype"]
        peaks[key] = max([peaks.get(key, 0.0)] + [r["matmul_peak"] for rs in by_impl.values() for r in rs])
    print_table({name: summarize(by_impl, peaks[CASES[name]["device"], CASES[name]["dtype"]])
                 for name, by_impl in runs.items()})
    for (device, dtype), peak in peaks.items():
        print(f"measured {device} {dtype} matmul peak: {peak / 1e12:.2f} TFLOP/s (best of the runs' samples)")
    print(f"speed from each run's median step; each figure the median of {args.rounds} run(s), "
          "the implementations taking turns, ratios to peft taken within each round")


if __name__ == "__main__":
    main()
