"""The one-shot GPU check: run on a lent H100/H200, it proves or disproves the CUDA paths in one table.

    python bench/gpu_check.py                  # on a CUDA machine; table and logs under $OUT (or --out)
    python bench/gpu_check.py --dry-run        # on the CPU: every check but the CUDA kernels, tiny shapes
    python bench/gpu_check.py --skip torchrun  # without the checks named so

Checks, each a row (PASS / FAIL with the measured figure and the bound it was held to):
  precision   bf16 and fp16 (autocast, LoRA A and B fp32) against fp32 on the same device: the
              step's loss and every LoRA gradient
  nf4         NF4 logits on the device against the CPU's (bitsandbytes' kernels on both)
  checkpoint  LoRA gradients with gradient checkpointing on and off
  packing     a packed row's loss against the same examples unpacked (fp32: SDPA with the
              block-diagonal mask); in bf16, packed rows through FlashAttention's varlen kernel
              against the same rows through the mask
  torchrun    train.py under `torchrun --nproc-per-node 1` (nccl; gloo in the dry run) with DDP
              and FSDP, and a DDP run stopped at step 2 and resumed, against one run of 4 steps
  speed       bench/train_speed.py's GPU cases against transformers+PEFT (CUDA only: the dry
              run skips them, the CPU case being bench/train_speed.py's own)

Models are random, in a small Llama shape, with a byte-level tokenizer and ChatML written here:
nothing is downloaded. The machine needs torch, transformers and peft (speed), bitsandbytes (nf4).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.loss import IGNORE_INDEX  # noqa: E402
from model.runtime import DTYPES  # noqa: E402

SHAPES = {  # (dry run, CUDA): small enough to build in seconds, NF4-able widths (multiples of 64)
    "dry": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16),
    "cuda": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=64),
}
VOCAB = 260  # 256 byte tokens and ChatML's two special tokens, and room to spare
# Bounds: the rounding of the low-precision dtype (bf16 8 bits of mantissa, fp16 11) carried
# through a few layers and a sum over hundreds of tokens; fp32 paths are equal up to fp32 sums.
BOUNDS = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 1e-5, "nf4": 1e-2}


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
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.05) + ("norm" in name))
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


def lora_model(model_dir, dtype, device, quantize=None, dropout=0.0):
    """The model with LoRA on every projection, B random (so that every gradient is non-zero)."""
    import lora
    from model import load_model
    model = load_model(model_dir, dtype, device)
    cfg = lora.LoRAConfig(r=8, alpha=16, dropout=dropout, targets=lora.LLAMA_LINEARS)
    torch.manual_seed(1)
    lora.inject_lora(model, cfg, quantize=quantize, compute_dtype=dtype)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
        m.lora_A.weight.data, m.lora_B.weight.data = m.lora_A.weight.data.float(), m.lora_B.weight.data.float()
    return model.train()


def loss_and_grads(model, ids, dtype, device) -> tuple[float, dict]:
    """The mean token loss and the LoRA gradients; under fp16 the loss is scaled by 2^16 before
    backward and the gradients unscaled after, as GradScaler does (fp16 gradients underflow without)."""
    from model.loss import lm_loss_sum
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        loss, n = lm_loss_sum(model, ids, ids)
    scale = 2.0**16 if dtype == torch.float16 else 1.0
    (loss / n * scale).backward()
    grads = {name: p.grad.detach().float().cpu() / scale for name, p in model.named_parameters()
             if p.grad is not None}
    return loss.item() / n, grads


def batch(device, B=4, T=256):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (B, T), generator=g).to(device)


# ----------------------------------------------------------------------------- the checks

def check_precision(model_dir, device, name):
    dtype = DTYPES[name]
    ids = batch(device)
    ref_loss, ref = loss_and_grads(lora_model(model_dir, torch.float32, device), ids, torch.float32, device)
    loss, grads = loss_and_grads(lora_model(model_dir, dtype, device), ids, dtype, device)
    worst = max(grads, key=lambda k: rel(grads[k], ref[k]))
    figure = max(abs(loss - ref_loss) / abs(ref_loss), rel(grads[worst], ref[worst]))
    return figure, BOUNDS[name], f"loss {loss:.5f} vs {ref_loss:.5f}; worst gradient {worst.split('.lora')[0]}"


def check_nf4(model_dir, device):
    ids = batch(device, B=2, T=64)
    with torch.no_grad():
        here = lora_model(model_dir, torch.bfloat16, device, quantize="nf4")(ids).float().cpu()
        cpu = lora_model(model_dir, torch.bfloat16, "cpu", quantize="nf4")(ids.cpu()).float()
    return rel(here, cpu), BOUNDS["nf4"], f"NF4 logits on {device} vs the CPU (bf16 compute)"


def check_checkpointing(model_dir, device):
    ids = batch(device)
    model = lora_model(model_dir, torch.float32, device)
    _, plain = loss_and_grads(model, ids, torch.float32, device)
    model.grad_checkpointing = True
    _, ckpt = loss_and_grads(model, ids, torch.float32, device)
    return max(rel(ckpt[k], plain[k]) for k in plain), BOUNDS["fp32"], "LoRA gradients, checkpointing on vs off"


def packing_examples():
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": ids, "labels": [IGNORE_INDEX] * 5 + ids[5:]}
            for ids in (torch.randint(0, 256, (n,), generator=g).tolist() for n in (40, 97, 23))]


def check_packing(model_dir, device):
    import data
    from model.loss import lm_loss_sum
    examples = packing_examples()
    model = lora_model(model_dir, torch.float32, device).eval()
    losses = []
    with torch.no_grad():
        for b in (data.collate(examples, 0), data.collate([examples], 0, pack=True)):
            b = {k: v.to(device) for k, v in b.items()}
            losses.append(lm_loss_sum(model, b["input_ids"], b["labels"], b.get("position_ids"),
                                      b.get("document_ids"))[0].item())
    unpacked, packed = losses
    return abs(packed - unpacked) / abs(unpacked), BOUNDS["fp32"], f"loss sum packed {packed:.4f} vs unpacked {unpacked:.4f}"


def check_varlen(model_dir, device):
    """bf16 packed rows (two of them, so documents cross rows) through varlen attention and through
    the mask: the loss and every LoRA gradient."""
    import data
    import model.llama as llama
    from model.loss import lm_loss_sum
    examples = packing_examples()
    b = {k: v.to(device) for k, v in data.collate([examples[:2], examples[2:]], 0, pack=True).items()}
    model = lora_model(model_dir, torch.bfloat16, device)
    runs = llama.varlen_runs
    results = []
    for varlen in (True, False):
        llama.varlen_runs = runs if varlen else (lambda x, config: False)
        try:
            model.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss, n = lm_loss_sum(model, b["input_ids"], b["labels"], b["position_ids"], b["document_ids"])
            (loss / n).backward()
            results.append((loss.item() / n, {k: p.grad.float().cpu() for k, p in model.named_parameters()
                                              if p.grad is not None}))
        finally:
            llama.varlen_runs = runs
    (loss, grads), (ref_loss, ref) = results
    kernel = "varlen" if runs(b["input_ids"].new_zeros(1, dtype=torch.bfloat16), model.config) else "mask (no varlen here)"
    figure = max(abs(loss - ref_loss) / abs(ref_loss), max(rel(grads[k], ref[k]) for k in ref))
    return figure, BOUNDS["bf16"], f"bf16 loss {loss:.5f} ({kernel}) vs {ref_loss:.5f} (mask) and LoRA gradients"


def train_cli(args, log: Path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", str(ROOT / "train.py"), *args]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=600).returncode
    if rc != 0:
        raise RuntimeError(f"train.py exited {rc}; see {log}")


def check_torchrun(model_dir, device, work: Path, mode: str):
    from safetensors.torch import load_file
    chats = write_chats(work / "chats.jsonl")
    base = ["--model", str(model_dir), "--data", str(chats), "--device", device, "--val-fraction", "0",
            "--micro-batch-size", "4", "--grad-accum", "2", "--lr", "1e-2", "--lora-r", "4",
            "--sample-prompts", "", "--parallel", "ddp" if mode == "resume" else mode, "--precision", "fp32"]
    log = work / f"torchrun-{mode}.log"
    whole = work / f"{mode}-whole"
    train_cli(base + ["--output-dir", str(whole), "--max-steps", "4", "--save-every", "2", "--overwrite"], log)
    adapter = lambda run: load_file(run / "adapter" / "adapter_model.safetensors")
    if mode != "resume":
        rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
        finite = all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
        return 0.0 if finite and len(rows) >= 4 else 1.0, 0.5, f"4 steps, losses finite: {finite}"
    cut = work / "resume-cut"  # the same run as if it had been stopped after its step-2 checkpoint
    shutil.rmtree(cut, ignore_errors=True)
    shutil.copytree(whole, cut)
    for later in ("checkpoints/step-000004", "adapter"):
        shutil.rmtree(cut / later)
    train_cli(base + ["--output-dir", str(cut), "--max-steps", "4", "--resume"], log)
    a, b = adapter(cut), adapter(whole)
    return max(rel(a[k], b[k]) for k in b), BOUNDS["fp32"], "adapter after 2 + 2 resumed steps vs 4 steps"


def check_speed(work: Path):
    cmd = [sys.executable, str(ROOT / "bench" / "train_speed.py"), "--case", "llama-3.2-1b",
           "--case", "llama-3.1-8b-qlora", "--case", "deepseek-llm-7b", "--scratch", str(work / "speed")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=420)
    (work / "speed.log").write_text(out.stdout + out.stderr)
    return out.stdout


# ----------------------------------------------------------------------------- the table

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes, no CUDA kernels")
    p.add_argument("--skip", nargs="*", default=[], metavar="CHECK",
                   help="leave out the checks whose names start with these words (e.g. torchrun)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "runs" / "gpu-check")))
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA device; pass --dry-run to check everything else on the CPU")
    device = "cpu" if args.dry_run else "cuda"
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)  # this script's own scratch, rebuilt each run
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    model_dir = write_model(work / "model", SHAPES["dry" if args.dry_run else "cuda"])
    checks = [("precision bf16", lambda: check_precision(model_dir, device, "bf16")),
              ("precision fp16", lambda: check_precision(model_dir, device, "fp16")),
              ("nf4 device vs cpu", lambda: check_nf4(model_dir, device)),
              ("grad checkpointing", lambda: check_checkpointing(model_dir, device)),
              ("packed vs unpacked", lambda: check_packing(model_dir, device)),
              ("packed varlen vs mask", lambda: check_varlen(model_dir, device)),
              ("torchrun ddp", lambda: check_torchrun(model_dir, device, work, "ddp")),
              ("torchrun fsdp", lambda: check_torchrun(model_dir, device, work, "fsdp")),
              ("torchrun ddp resume", lambda: check_torchrun(model_dir, device, work, "resume"))]
    checks = [(name, run) for name, run in checks if not any(name.startswith(w) for w in args.skip)]
    rows = []
    for name, run in checks:
        t = time.perf_counter()
        try:
            figure, bound, what = run()
            status = "PASS" if figure <= bound else "FAIL"
            rows.append((name, status, f"{figure:.2e}", f"{bound:.0e}", what, time.perf_counter() - t))
        except Exception as e:  # a check that cannot run is a row of the table, not the end of it
            (work / f"{name.replace(' ', '-')}.error").write_text(traceback.format_exc())
            rows.append((name, "ERROR", "-", "-", f"{type(e).__name__}: {str(e)[:100]}", time.perf_counter() - t))
        print(f"{rows[-1][0]}: {rows[-1][1]} {rows[-1][2]} ({rows[-1][4]})", flush=True)
    speed = "skipped (dry run: no CUDA)" if args.dry_run else check_speed(work)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    lines = [f"# gpu_check on {device_name}, torch {torch.__version__}", "",
             "| check | result | figure | bound | what | s |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {s} | {f} | {b} | {w} | {t:.1f} |" for n, s, f, b, w, t in rows]
    lines += ["", "## speed (bench/train_speed.py)", "", speed, "",
              f"total {time.perf_counter() - t0:.0f} s; logs in {work}"]
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(1 if any(r[1] != "PASS" for r in rows) else 0)


if __name__ == "__main__":
    main()
