"""The rows of bench/gpu_check.py: each check of a CUDA path, run alone in its own process.

A check returns Result(figure, bound, what) (PASS when figure <= bound), Measured(what, figures)
for the speed and memory figures, or raises Skip(reason) when it cannot test what its name says
(no bitsandbytes, no varlen kernel in this torch, no CUDA in a dry run): never a PASS for a path
that did not run.

Models are random, in a small Llama shape, with a byte-level tokenizer and ChatML written here:
nothing is downloaded. Shapes: "cuda" (4 layers, 512 wide) for the GPU and for `--dry-run`, which
runs every row on the CPU at the same shape; "tiny" (2 layers, 64 wide) for the test suite.
"""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.loss import IGNORE_INDEX  # noqa: E402
from model.runtime import DTYPES  # noqa: E402

SHAPES = {  # NF4-able widths (multiples of 64); GQA (2 query heads per K/V head), as Llama 3
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "cuda": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=64),
}
VOCAB = 260  # 256 byte tokens and ChatML's two special tokens, and room to spare
WEIGHT_STD = 0.05  # of the random matrices (norm weights: 1 + N(0, 0.1))


class Skip(Exception):
    """The row cannot test what it names here; the message says why."""


@dataclass
class Result:
    figure: float  # the measured difference (relative, unless `what` says otherwise)
    bound: float  # PASS when figure <= bound
    what: str
    figures: dict = field(default_factory=dict)  # what else was measured (the memory estimate's GiB)


@dataclass
class Measured:
    what: str
    figures: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- bounds

def unit_roundoff(dtype: torch.dtype) -> float:
    """u: the largest relative error of one rounding to `dtype` (2^-8 bf16, 2^-11 fp16, 2^-24 fp32)."""
    return torch.finfo(dtype).eps / 2


def precision_bound(dtype: torch.dtype, shape: dict) -> float:
    """How far a LoRA step's loss and gradients in `dtype` (autocast) may be from fp32's, relative.

    Each rounding to `dtype` moves a value by at most u (unit_roundoff), in a direction independent
    of the other roundings, so errors add in quadrature: along the network's depth, the L layers'
    roundings (forward and backward) give a factor sqrt(L). Width enters through the attention
    logits q.k / sqrt(head_dim): with normed inputs and weights of std s, each is of size
    sigma = hidden_size * s^2 (1.28 at 512 wide), its rounding error is u * sigma, and softmax and
    its gradient pass that on as is; the 1 is what the unit-sized activations contribute. So
        bound = 8 * u * sqrt(L) * (1 + sigma).
    Measured on the CPU (autocast, fp32 accumulation, as cuBLAS) the worst gradient sat at 2.1 to
    3.6 times u sqrt(L) (1 + sigma) over depths 2 to 16 and widths 64 to 1024, in bf16 and fp16
    alike; 8 leaves a factor 2 for other kernels' reduction orders. A wrong kernel (a mask, a
    scale, a dropped term) moves gradients by tens of percent and fails it even in bf16.
    """
    sigma = shape["hidden_size"] * WEIGHT_STD**2
    return 8 * unit_roundoff(dtype) * math.sqrt(shape["num_hidden_layers"]) * (1 + sigma)


# Two fp32 computations that only sum in another order (checkpointing's recompute, packing, one rank
# against one process): a few fp32 roundings of each value, far below any real difference.
FP32_BOUND = 1e-5


# ----------------------------------------------------------------------------- the model and data

def write_model(path: Path, shape: dict, seed: int = 0) -> Path:
    """A random Llama (nanolora's own init, norms near 1) with a byte-level BPE tokenizer and ChatML."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from data.templates import BUILTIN_TEMPLATES
    from model.config import LlamaConfig
    from model.llama import Llama
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=VOCAB, eos_token_id=257, **shape)
    torch.manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else WEIGHT_STD) + ("norm" in name))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, []))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": BUILTIN_TEMPLATES["chatml"]}))
    return path


def write_chats(path: Path, n: int = 32) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"Ahoy! {i} plus {i} is {2 * i}." + " Aye." * (i % 5)}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def worst(grads: dict, ref: dict) -> tuple[float, str]:
    """The largest relative difference over the LoRA gradients, and whose it is."""
    name = max(ref, key=lambda k: rel(grads[k], ref[k]))
    return rel(grads[name], ref[name]), name.split(".lora")[0]


def lora_model(model_dir, dtype, device, quantize=None, grad_checkpointing=False):
    """The model with LoRA on every projection, B random (so that every gradient is non-zero), the
    same for the same arguments."""
    import lora
    from model import load_model
    model = load_model(model_dir, dtype, device, grad_checkpointing=grad_checkpointing)
    cfg = lora.LoRAConfig(r=8, alpha=16, dropout=0.0, targets=lora.LLAMA_LINEARS)
    torch.manual_seed(1)
    lora.inject_lora(model, cfg, quantize=quantize, compute_dtype=dtype)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
        m.lora_A.weight.data, m.lora_B.weight.data = m.lora_A.weight.data.float(), m.lora_B.weight.data.float()
    return model.train()


def loss_and_grads(model, batch: dict, dtype) -> tuple[float, dict]:
    """The mean token loss of `batch` (input_ids, labels, maybe position_ids, document_ids) and the
    LoRA gradients; under fp16 the loss is scaled by 2^16 before backward and the gradients unscaled
    after, as GradScaler does (fp16 gradients underflow without)."""
    from model.loss import lm_loss_sum
    device = batch["input_ids"].device.type
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        loss, n = lm_loss_sum(model, batch["input_ids"], batch["labels"], batch.get("position_ids"),
                              batch.get("document_ids"))
    scale = 2.0**16 if dtype == torch.float16 else 1.0
    (loss / n * scale).backward()
    grads = {name: p.grad.detach().float().cpu() / scale for name, p in model.named_parameters()
             if p.grad is not None}
    return loss.item() / n, grads


def random_batch(device, B=4, T=256) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (B, T), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def packing_examples():
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": ids, "labels": [IGNORE_INDEX] * 5 + ids[5:]}
            for ids in (torch.randint(0, 256, (n,), generator=g).tolist() for n in (40, 97, 23, 61))]


def packed_batch(device) -> dict:
    """Two packed rows of four examples (documents of 40, 97 | 23, 61 tokens), on `device`."""
    import data
    examples = packing_examples()
    batch = data.collate([examples[:2], examples[2:]], 0, pack=True)
    return {k: v.to(device) for k, v in batch.items()}


def dtype_of(name: str) -> torch.dtype:
    return DTYPES[name]


# ----------------------------------------------------------------------------- correctness rows

def check_precision(ctx, precision: str):
    dtype = dtype_of(precision)
    batch = random_batch(ctx.device)
    ref_loss, ref = loss_and_grads(lora_model(ctx.model_dir, torch.float32, ctx.device), batch, torch.float32)
    loss, grads = loss_and_grads(lora_model(ctx.model_dir, dtype, ctx.device), batch, dtype)
    figure, where = worst(grads, ref)
    figure = max(abs(loss - ref_loss) / abs(ref_loss), figure)
    return Result(figure, precision_bound(dtype, ctx.shape),
                  f"loss {loss:.5f} vs fp32 {ref_loss:.5f}; worst LoRA gradient {where}")


def packed_kernel_runs(kind: str, model, batch) -> tuple[float, dict]:
    """loss_and_grads of a packed batch with model.llama.packed_kernel forced to `kind`."""
    import model.llama as llama
    chosen = llama.packed_kernel
    llama.packed_kernel = lambda x, config: kind
    try:
        return loss_and_grads(model, batch, model.model.embed_tokens.weight.dtype)
    finally:
        llama.packed_kernel = chosen


def check_packed_kernel(ctx, kind: str, precision: str):
    """Packed rows (two, documents of different lengths) through `kind` against the block-diagonal
    mask: the loss and every LoRA gradient, in the same precision."""
    import model.llama as llama
    dtype = dtype_of(precision)
    batch = packed_batch(ctx.device)
    probe = torch.zeros(1, device=ctx.device, dtype=dtype)
    if kind == "varlen" and not llama.varlen_runs(probe, llama_config(ctx)):
        raise Skip(varlen_missing(ctx.device, dtype))
    model = lora_model(ctx.model_dir, dtype, ctx.device)
    loss, grads = packed_kernel_runs(kind, model, batch)
    ref_loss, ref = packed_kernel_runs("mask", model, batch)
    figure, where = worst(grads, ref)
    figure = max(abs(loss - ref_loss) / abs(ref_loss), figure)
    bound = FP32_BOUND if dtype == torch.float32 else precision_bound(dtype, ctx.shape)
    return Result(figure, bound, f"{precision} loss {loss:.5f} ({kind}) vs {ref_loss:.5f} (mask); worst {where}")


def varlen_missing(device: str, dtype) -> str:
    import model.llama as llama
    if device != "cuda":
        return "FlashAttention's varlen kernel runs on CUDA only"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if llama.varlen_kernel() is None:
        return (f"torch {torch.__version__}'s varlen_attn lacks window_size/enable_gqa (torch >= 2.12): "
                "packed rows take the per-document path here")
    return f"varlen does not run for {dtype} on this device (compute capability < 8.0?)"


def llama_config(ctx):
    from model.config import LlamaConfig
    return LlamaConfig.from_file(ctx.model_dir / "config.json")


def check_packing(ctx):
    """A packed row's loss sum against the same examples unpacked (fp32, on the device's own path)."""
    import data
    from model.loss import lm_loss_sum
    examples = packing_examples()
    model = lora_model(ctx.model_dir, torch.float32, ctx.device).eval()
    losses = []
    with torch.no_grad():
        for b in (data.collate(examples, 0), data.collate([examples], 0, pack=True)):
            b = {k: v.to(ctx.device) for k, v in b.items()}
            losses.append(lm_loss_sum(model, b["input_ids"], b["labels"], b.get("position_ids"),
                                      b.get("document_ids"))[0].item())
    unpacked, packed = losses
    return Result(abs(packed - unpacked) / abs(unpacked), FP32_BOUND,
                  f"loss sum packed {packed:.4f} vs unpacked {unpacked:.4f}")


def check_checkpointing(ctx):
    batch = random_batch(ctx.device)
    _, plain = loss_and_grads(lora_model(ctx.model_dir, torch.float32, ctx.device), batch, torch.float32)
    ckpt_model = lora_model(ctx.model_dir, torch.float32, ctx.device, grad_checkpointing=True)
    _, ckpt = loss_and_grads(ckpt_model, batch, torch.float32)
    figure, where = worst(ckpt, plain)
    return Result(figure, FP32_BOUND, f"LoRA gradients, checkpointing on vs off; worst {where}")


def check_nf4(ctx):
    """NF4 logits on the device against the CPU's: bitsandbytes' CUDA kernels against its CPU ones,
    on the same 4-bit codes (quantization is deterministic). Both compute in bf16, so they may
    differ by bf16 rounding of the dequantized weights and of the sums."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Skip("bitsandbytes is not installed here (carry .gpu/: make gpu-bundle)") from None
    batch = random_batch(ctx.device, B=2, T=64)
    with torch.no_grad():
        here = lora_model(ctx.model_dir, torch.bfloat16, ctx.device, quantize="nf4")(batch["input_ids"]).float().cpu()
        cpu = lora_model(ctx.model_dir, torch.bfloat16, "cpu", quantize="nf4")(batch["input_ids"].cpu()).float()
    figure = rel(here, cpu)
    if ctx.device != "cuda":
        raise Skip(f"dry run: both sides ran on the CPU (difference {figure:.1e}); nothing CUDA was compared")
    return Result(figure, precision_bound(torch.bfloat16, ctx.shape),
                  f"NF4 logits on {ctx.device} vs the CPU (bf16 compute)")


# ----------------------------------------------------------------------------- torchrun rows

def train_cli(ctx, args: list[str], torchrun: bool, log_name: str):
    """train.py (under `torchrun --nproc-per-node 1` when asked), its output appended to the row's log."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"] if torchrun else []
    cmd = [sys.executable, *launcher, str(ROOT / "train.py"), *args]
    with open(ctx.scratch / "logs" / f"{log_name}.log", "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise RuntimeError(f"train.py exited {rc}")


def train_args(ctx, precision: str, out: Path, mode: str = "ddp") -> list[str]:
    chats = ctx.scratch / "chats.jsonl"
    if not chats.exists():
        write_chats(chats)
    return ["--model", str(ctx.model_dir), "--data", str(chats), "--device", ctx.device, "--val-fraction", "0",
            "--micro-batch-size", "4", "--grad-accum", "2", "--lr", "1e-2", "--lora-r", "4", "--sample-prompts", "",
            "--precision", precision, "--parallel", mode, "--max-steps", "4", "--save-every", "2",
            "--output-dir", str(out)]


def single_process_run(ctx, precision: str, log_name: str) -> Path:
    """The run every torchrun row is compared with: train.py in one process, 4 steps; made once per
    precision and kept in the scratch directory (written under another name, renamed when done)."""
    done = ctx.scratch / f"single-{precision}"
    if not (done / "adapter").exists():
        tmp = done.with_name(done.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        train_cli(ctx, train_args(ctx, precision, tmp), torchrun=False, log_name=log_name)
        tmp.rename(done)
    return done


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(run / "adapter" / "adapter_model.safetensors")


def check_torchrun(ctx, mode: str, precision: str, log_name: str):
    """train.py under torchrun (nccl on CUDA, gloo in the dry run) with DDP or FSDP2 against the same
    run in one process: the adapter after 4 steps. bf16 is the path users run: the base in bf16,
    LoRA and AdamW in fp32."""
    single = single_process_run(ctx, precision, log_name)
    out = ctx.scratch / f"{mode}-{precision}"
    train_cli(ctx, train_args(ctx, precision, out, mode) + ["--overwrite"], torchrun=True, log_name=log_name)
    a, b = adapter_tensors(out), adapter_tensors(single)
    figure = max(rel(a[k], b[k]) for k in b)
    bound = FP32_BOUND if precision == "fp32" else precision_bound(dtype_of(precision), ctx.shape)
    return Result(figure, bound, f"{mode} {precision} adapter after 4 steps vs one process")


def check_resume(ctx, log_name: str):
    """A DDP run stopped after its step-2 checkpoint and resumed against the run of 4 steps."""
    whole = single_process_run(ctx, "fp32", log_name)
    cut = ctx.scratch / "resume-cut"  # the same run as if it had been stopped after step 2
    shutil.rmtree(cut, ignore_errors=True)
    shutil.copytree(whole, cut)
    for later in ("checkpoints/step-000004", "adapter"):
        shutil.rmtree(cut / later)
    train_cli(ctx, train_args(ctx, "fp32", cut) + ["--resume"], torchrun=True, log_name=log_name)
    a, b = adapter_tensors(cut), adapter_tensors(whole)
    return Result(max(rel(a[k], b[k]) for k in b), FP32_BOUND,
                  "adapter after 2 + 2 steps resumed under torchrun vs 4 steps in one process")


# ----------------------------------------------------------------------------- speed rows

def check_speed(ctx, case: str, against_peft: bool = True):
    """bench/train_speed.py's case, nanolora against transformers+PEFT (against_peft: False, ours
    alone: a flag peft lacks), each in its own process: tokens/s, peak memory allocated and reserved. A dry run runs the case's code path at a tiny
    shape on the CPU (its figures mean nothing)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import train_speed
    spec = train_speed.CASES[case]
    if spec["quantize"]:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise Skip("bitsandbytes is not installed here (carry .gpu/: make gpu-bundle)") from None
    name = case if ctx.device == "cuda" else case + "-dry"
    steps, warmup = (5, 3) if ctx.device == "cuda" else (2, 1)
    runs = train_speed.run_case(name, ["nanolora", "peft"] if against_peft else ["nanolora"], steps, warmup, rounds=1)
    ours = runs["nanolora"][0]
    if not against_peft:
        figures = {f"nanolora {k}": round(v, 3) for k, v in ours.items() if k in ("tokens_per_s", "peak_gib", "reserved_gib")}
        return Measured(f"{name}: {ours['tokens_per_s']:.0f} tokens/s; peak {ours['peak_gib']:.2f} GiB allocated, "
                        f"{ours['reserved_gib']:.2f} reserved", figures)
    peft = runs["peft"][0]
    figures = {f"{impl} {k}": round(v, 3) for impl, r in (("nanolora", ours), ("peft", peft))
               for k, v in r.items() if k in ("tokens_per_s", "peak_gib", "reserved_gib")}
    what = (f"{name}: {ours['tokens_per_s']:.0f} vs {peft['tokens_per_s']:.0f} tokens/s "
            f"({ours['tokens_per_s'] / peft['tokens_per_s']:.2f}x); peak {ours['peak_gib']:.2f} vs "
            f"{peft['peak_gib']:.2f} GiB allocated, {ours['reserved_gib']:.2f} vs {peft['reserved_gib']:.2f} reserved")
    return Measured(what, figures)
