"""LoRA / QLoRA fine-tuning of a Llama-family model, one loop read top to bottom.

    python train.py                          # the embedded demo: SmolLM2-135M-Instruct, sample data
    python train.py --model deepseek-ai/deepseek-llm-7b-chat --data emollm.json \\
        --micro-batch-size 2 --grad-accum 8 --precision bf16 --grad-checkpointing
    python train.py --config run.toml --lr 1e-4   # a config file; flags win

The update, per optimizer step, is that of Hu et al. (2021): only the low-rank A and B of each
target linear layer train (h = W0 x + (alpha / r) B A x), the base model stays frozen. The loss of a
step is the sum of the token losses of all its micro-batches divided by the number of trained
tokens in the whole step, so micro-batch 4 x accumulation 1 gives the same update as 1 x 4.
"""

import argparse
import ctypes
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

import data
import lora
import parallel
import sweep
import run_dir
from checkpoint import (list_checkpoints, load_checkpoint, read_trainer_state, remove_partial_checkpoints,
                        save_checkpoint)
from model import DEMO_MODEL, load_model, resolve_model_dir
from model.load import meta_model
from model.errors import UserError, run_command
from model.generate import generate
from model.fused import reference_path
from model.llama import packed_documents
from model.loss import trained_positions

ROOT = Path(__file__).resolve().parent
DEMO_DATA = ROOT / "examples" / "train.json"
DEMO_VAL_DATA = ROOT / "examples" / "val.json"
DEMO_PROMPTS = ROOT / "examples" / "prompts.txt"


def flag(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what to train on
    model: str = flag(DEMO_MODEL, "model directory or hub id ('demo': the offline SmolLM2-135M-Instruct)")
    data: str = flag(str(DEMO_DATA), "training data (.json, .jsonl, .csv)")
    val_data: str | None = flag(None, "validation data (default: --val-fraction of --data; the demo data has its own)")
    val_fraction: float = flag(0.1, "share of --data held out for validation when there is no --val-data")
    output_dir: str = flag("runs/demo", "where metrics, TensorBoard logs, checkpoints and the adapter go")
    max_seq_len: int = flag(512, "longer examples are truncated")
    mask: str = flag("assistant", "which tokens train: assistant | last | all")
    template: str | None = flag(None, "built-in chat template instead of the model's own")
    pack: bool = flag(False, "pack several examples per row (block-diagonal attention)")
    group_by_length: bool = flag(False, "batch examples of similar length together")
    # how long and how big
    max_steps: int = flag(0, "optimizer steps (0: from --epochs)")
    epochs: float = flag(3.0, "passes over the training data when --max-steps is 0")
    micro_batch_size: int = flag(4, "examples per forward/backward")
    grad_accum: int = flag(2, "micro-batches per optimizer step")
    # optimizer and schedule
    lr: float = flag(1e-3, "peak learning rate")
    lr_schedule: str = flag("cosine", "cosine | linear | constant, after warmup")
    warmup_steps: int = flag(0, "linear warmup steps (overrides --warmup-ratio)")
    warmup_ratio: float = flag(0.1, "warmup as a share of all steps")
    min_lr_ratio: float = flag(0.0, "the schedule decays to lr * min_lr_ratio")
    weight_decay: float = flag(0.0, "AdamW weight decay (never on biases and norms)")
    adam_betas: str = flag("0.9,0.999", "AdamW betas")
    adam_eps: float = flag(1e-8, "AdamW epsilon")
    amsgrad: bool = flag(False, "AMSGrad variant of AdamW")
    max_grad_norm: float = flag(1.0, "clip the global gradient norm (0: no clipping)")
    max_skipped_steps: int = flag(10, "fp16: stop when the loss scaler skips this many steps in a row")
    # LoRA
    lora_r: int = flag(16, "rank of A and B")
    lora_alpha: float = flag(32.0, "scaling = alpha / r (alpha / sqrt(r) with --rslora)")
    lora_dropout: float = flag(0.05, "dropout on the LoRA path")
    lora_targets: str = flag("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                             "comma-separated module names, or all-linear")
    rslora: bool = flag(False, "rank-stabilised scaling alpha / sqrt(r)")
    quantize: str | None = flag(None, "nf4: QLoRA, the frozen base in 4-bit NF4")
    # hardware
    precision: str = flag("auto", "bf16 | fp16 | fp32 (auto: bf16 on CUDA when supported, else fp32)")
    device: str = flag("auto", "cpu | cuda (auto: cuda when available)")
    grad_checkpointing: bool = flag(False, "recompute each decoder block in backward to save memory")
    compile: bool = flag(False, "torch.compile each decoder block")
    reference: bool = flag(False, "run the textbook twins of the fast pieces (model/fused.py): the same "
                                  "results, slower, every intermediate tensor hookable")
    tf32: bool = flag(True, "on CUDA, fp32 matmuls on tensor cores in TF32 (--no-tf32: full fp32)")
    parallel: str = flag("ddp", "under torchrun: ddp (a model replica per GPU) | fsdp (FSDP2: model sharded)")
    parallel_timeout: float = flag(600.0, "seconds a rank waits for the others before the job fails")
    seed: int = flag(42, "seeds data order, LoRA init and dropout")
    # bookkeeping
    log_every: int = flag(1, "print a log line every N steps")
    eval_every: int = flag(0, "evaluate every N steps (0: before and after training only)")
    save_every: int = flag(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = flag(2, "how many newest checkpoints to keep")
    resume: bool = flag(False, "continue from the newest checkpoint in --output-dir (the same run only)")
    overwrite: bool = flag(False, "replace the run already in --output-dir (its metrics, checkpoints, adapter)")
    debug_grads: bool = flag(False, "per-module LoRA gradient norms and update/weight ratios, every step")
    sample_prompts: str = flag(str(DEMO_PROMPTS), "file of prompts (one per line) answered at each eval")
    sample_tokens: int = flag(48, "max new tokens of each eval sample reply")
    # sweeps (sweep.py)
    sweep: str | None = flag(None, "train once per setting of a grid, e.g. --sweep lr=2e-4,1e-3 lora_r=8,64")
    sweep_samples: int = flag(0, "train only N settings of the --sweep grid, drawn with --seed (0: all)")


class TrainError(UserError):
    """A problem with the run's settings or files: printed as one line, exit code 2."""


# -----------------------------------------------------------------------------
# settings: dataclass defaults < --config file < command-line flags

def parse_config(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="TOML or JSON file of settings (flags win)")
    for f in fields(TrainConfig):
        name = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        elif f.name == "sweep":  # --sweep lr=2e-4,1e-3 lora_r=8,64: several items, kept as one string
            parser.add_argument(name, nargs="+", help=f.metadata["help"])
        else:
            kind = {int: int, float: float}.get(f.type, str)
            parser.add_argument(name, type=kind, help=f.metadata["help"])
    flags = vars(parser.parse_args(argv))
    if "sweep" in flags:
        flags["sweep"] = " ".join(flags["sweep"])
    from_file = read_config_file(flags.pop("config")) if "config" in flags else {}
    cfg = TrainConfig(**{**from_file, **flags})
    check_config(cfg)
    for setting in sweep.settings(cfg) if cfg.sweep else []:  # every run of a sweep, before the first
        check_config(replace(cfg, **setting))
    return cfg


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"--config {path}: no such file")
    try:
        text = p.read_text()
        if p.suffix == ".toml":
            import tomllib
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:  # tomllib's and json's errors give line and column
        raise TrainError(f"--config {path}: {e}") from None
    if not isinstance(values, dict):
        raise TrainError(f"--config {path}: expected a table of settings, got {type(values).__name__}")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise TrainError(f"--config {path}: unknown settings {', '.join(unknown)}")
    if isinstance(values.get("sweep"), dict):  # a [sweep] table: lr = [2e-4, 1e-3]
        values["sweep"] = sweep.spec_from_table(values["sweep"])
    for name, value in values.items():
        expected = type_error(value, kinds[name])
        if expected:
            raise TrainError(f"--config {path}: {name} = {json.dumps(value)}: expected {expected}")
    return {k: float(v) if kinds[k] is float else v for k, v in values.items()}


def type_error(value, kind) -> str | None:
    """What a config file's value should have been, or None if it is of the setting's type.

    Strict: "false" is not a boolean (any non-empty string would be true), true is not a number."""
    optional = kind == (str | None)
    if value is None and optional:
        return None
    checks = {bool: (lambda v: isinstance(v, bool), "true or false"),
              int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
              float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
              str: (lambda v: isinstance(v, str), "a string")}
    ok, text = checks[str if optional else kind]
    return None if ok(value) else text + (" (or leave it out)" if optional else "")


# The range of every numeric setting, as an interval: "[" includes its end, "(" excludes it.
# Floats must also be finite (argparse and JSON accept nan and inf).
RANGES = {
    "max_seq_len": "[2, inf)", "micro_batch_size": "[1, inf)", "grad_accum": "[1, inf)", "lora_r": "[1, inf)",
    "max_steps": "[0, inf)", "epochs": "(0, inf)", "lr": "(0, inf)", "warmup_steps": "[0, inf)",
    "warmup_ratio": "[0, 1]", "min_lr_ratio": "[0, 1]", "weight_decay": "[0, inf)", "adam_eps": "(0, 1)",
    "max_grad_norm": "[0, inf)", "max_skipped_steps": "[1, inf)", "lora_alpha": "(0, inf)",
    "lora_dropout": "[0, 1)", "val_fraction": "[0, 1)",
    "parallel_timeout": "(0, inf)", "log_every": "[0, inf)", "eval_every": "[0, inf)", "save_every": "[0, inf)",
    "keep_checkpoints": "[0, inf)", "sample_tokens": "[0, inf)", "sweep_samples": "[0, inf)",
}


def in_range(value, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return math.isfinite(value) and above and below


def check_config(cfg: TrainConfig):
    """Every setting, for type and range, before any work: the message names the flag."""
    choices = {"lr_schedule": ("cosine", "linear", "constant"), "mask": ("assistant", "last", "all"),
               "precision": ("auto", "bf16", "fp16", "fp32"), "device": ("auto", "cpu", "cuda"),
               "quantize": (None, "nf4"), "parallel": ("ddp", "fsdp")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise TrainError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected one of "
                             f"{', '.join(str(a) for a in allowed if a)}")
    for name, interval in RANGES.items():
        if not in_range(getattr(cfg, name), interval):
            raise TrainError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be in {interval}")
    if len(betas(cfg)) != 2 or not all(in_range(b, "[0, 1)") for b in betas(cfg)):
        raise TrainError(f"--adam-betas {cfg.adam_betas}: expected two numbers in [0, 1) like 0.9,0.999")
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in --output-dir and --overwrite replaces it: pass one")
    for name in ("data", "val_data"):
        if getattr(cfg, name) and not Path(getattr(cfg, name)).is_file():
            raise TrainError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: no such file")
    if cfg.sample_prompts and not Path(cfg.sample_prompts).is_file():
        raise TrainError(f"--sample-prompts {cfg.sample_prompts}: no such file (pass '' for no samples)")
    if cfg.parallel == "fsdp" and cfg.quantize:
        raise TrainError("--parallel fsdp cannot shard NF4 weights; train QLoRA with --parallel ddp")
    if cfg.parallel == "fsdp" and cfg.precision == "fp16":
        # GradScaler's inf check would see only this rank's shard of the gradients
        raise TrainError("--parallel fsdp does not support --precision fp16; use bf16")
    if cfg.parallel == "fsdp" and not parallel.fsdp2_available():
        raise TrainError(f"--parallel fsdp: this torch ({torch.__version__}) lacks the FSDP2 features it "
                         "needs; upgrade torch or use --parallel ddp")


def betas(cfg) -> tuple[float, ...]:
    try:
        return tuple(float(b) for b in cfg.adam_betas.split(","))
    except ValueError:
        raise TrainError(f"--adam-betas {cfg.adam_betas}: expected two numbers like 0.9,0.999") from None


def resolve_device_and_dtype(cfg: TrainConfig) -> tuple[str, torch.dtype]:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def keep_freed_memory():
    """On the CPU, have glibc keep freed memory for reuse rather than hand it back to the system.

    A training step frees and reallocates the same activation and logits buffers (megabytes to
    hundreds of megabytes each) every time. By default glibc serves such blocks with fresh mmaps and
    unmaps them on free, so every step page-faults (and zero-fills) all of them again: about 5% of
    a step of the demo model on the CPU. Raising the mmap and trim thresholds keeps them in the
    heap; the process's RSS then stays at its peak, which a training run reaches every step anyway.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): leave the allocator alone
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's <malloc.h>
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


def lr_at(step: int, cfg: TrainConfig, total_steps: int, warmup: int) -> float:
    """Learning rate of update number `step` (0-based): linear warmup, then decay to min_lr_ratio."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)  # 0 -> 1 over the decay
    decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress,
             "constant": 1.0}[cfg.lr_schedule]
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def micro_batch_stream(lengths, cfg: TrainConfig, epoch: int, index: int):
    """Yield (epoch, next index, micro-batch of example indices), across epochs, from a position.

    Under torchrun the micro-batches hold micro_batch_size x world size examples and each rank
    gets its slice (maybe empty at an epoch's end); epoch and index are the same on every rank."""
    while True:
        batches = data.micro_batches(lengths, cfg.micro_batch_size * parallel.world_size(), cfg.seed,
                                     epoch, cfg.group_by_length, cfg.pack, cfg.max_seq_len)
        for i in range(index, len(batches)):
            yield epoch, i + 1, parallel.rank_share(batches[i], cfg.micro_batch_size)
        epoch, index = epoch + 1, 0


def to_device(batch: dict, device) -> dict:
    """The batch on `device`, with what the step reads of it counted first, on the CPU (counted on
    a GPU, each would make the host wait): n_trained and n_tokens, trained_index, the positions
    the loss gathers (model.loss.trained_positions), and for packed rows the documents' bounds
    that varlen attention reads (model.llama.packed_documents)."""
    batch = {**batch, "trained_index": trained_positions(batch["labels"])}
    if "document_ids" in batch:
        batch["documents"] = packed_documents(batch["document_ids"])
    counts = {"n_trained": batch["trained_index"].numel(), "n_tokens": int(batch["attention_mask"].sum())}
    return {**{k: v.to(device, non_blocking=True) for k, v in batch.items()}, **counts}


def forward_loss(loss_fn, batch, autocast):
    """Sum of token losses of one micro-batch (fp32) and its trained-token count.

    loss_fn is the model with lm_loss_sum as its forward (parallel.LossSum), maybe wrapped in DDP."""
    with autocast:
        return loss_fn(batch)


@torch.no_grad()
def evaluate(loss_fn, batches, autocast) -> dict:
    """Validation loss (mean over trained tokens, of all ranks' batches) and perplexity."""
    loss_fn.eval()
    total, n = 0.0, 0
    for batch in batches:
        loss, count = forward_loss(loss_fn, batch, autocast)
        total, n = total + loss.item(), n + count
    total, n = parallel.all_reduce_sum(total, n)
    loss_fn.train()
    val_loss = total / max(n, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}


@torch.no_grad()
def sample_replies(model, tok, prompts, max_new_tokens, autocast) -> list[str]:
    """Greedy replies to the fixed prompts, so the change in answers shows in TensorBoard.

    Under FSDP every forward needs every rank, so all of them generate all max_new_tokens (a stop
    token must not end one rank's loop early) and the reply is cut at the stop token after."""
    model.eval()
    replies = []
    stop_ids = () if parallel.is_fsdp(model) else tok.stop_ids
    for prompt in prompts:
        ids = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        with autocast:
            reply = list(generate(model, ids, max_new_tokens, stop_ids))
        stop = [i for i, t in enumerate(reply) if t in tok.stop_ids]
        replies.append(tok.decode(reply[:stop[0]] if stop else reply))
    model.train()
    return replies


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most max_norm (0: leave them), as
    clip_grad_norm_ does, and return the norm before clipping as a 0-dim tensor, with no host
    sync: foreach kernels, the scale factor applied on the device.

    A non-finite norm leaves the gradients as they are, so the module that made it can be named
    (the caller stops the run, or under fp16 GradScaler skips the update). Under FSDP the
    gradients are shards (DTensors): their norm is combined over the ranks (parallel.full) and the
    factor applied per shard as a number, which takes one sync."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = any(parallel.is_shard(g) for g in grads)
    norms = [torch.linalg.vector_norm(g) for g in grads] if sharded else torch._foreach_norm(grads)
    norm = parallel.full(torch.linalg.vector_norm(torch.stack(norms)))
    if max_norm > 0:
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s factor
        factor = torch.where(torch.isfinite(norm), factor, torch.ones_like(factor))
        if sharded:
            for g in grads:
                g.mul_(factor.item())
        else:
            torch._foreach_mul_(grads, factor)
    return norm


def nonfinite_grad_modules(model) -> list[str]:
    """Names of the parameters whose gradient holds inf or nan, in model order."""
    return [name for name, p in model.named_parameters()
            if p.grad is not None and not torch.isfinite(parallel.full(p.grad)).all()]


def divergence_message(model, step, loss, grad_norm, skipped_in_a_row, loss_scale) -> str:
    """Why the run stops: the step, its loss and grad norm, the first module whose gradient is not
    finite, and under fp16 how many updates in a row GradScaler skipped and at what scale."""
    bad = nonfinite_grad_modules(model)
    where = f"first non-finite gradient in {bad[0]}" if bad else "gradients finite"
    fp16 = (f"; {skipped_in_a_row} steps in a row skipped by the fp16 loss scaler, the last at scale {loss_scale:g}"
            if skipped_in_a_row else "")
    return (f"step {step}: loss {loss}, grad_norm {grad_norm}; {where} ({len(bad)} parameters affected)"
            f"{fp16}. Last good checkpoint kept.")


def grad_report(model, before: dict) -> list[tuple]:
    """(module, |grad A|, |grad B|, |dA|/|A|, |dB|/|B|) for every LoRA module (--debug-grads)."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, lora.LoRALinear):
            A, B = parallel.full(m.lora_A.weight), parallel.full(m.lora_B.weight)  # whole, under FSDP
            ratio = [((p - before[f"{name}.{k}"]).norm() / p.norm().clamp_min(1e-12)).item()
                     for k, p in (("A", A), ("B", B))]
            grads = [parallel.full(m.lora_A.weight.grad), parallel.full(m.lora_B.weight.grad)]
            rows.append((name, *(g.norm().item() for g in grads), *ratio))
    return rows


def print_grad_table(console, step, rows):
    from rich.table import Table
    table = Table(title=f"LoRA gradients, step {step}", show_lines=False)
    for col in ("module", "|grad A|", "|grad B|", "|dA|/|A|", "|dB|/|B|"):
        table.add_column(col, justify="left" if col == "module" else "right", overflow="fold")
    for name, *values in rows:
        table.add_row(name, *(f"{v:.3e}" for v in values))
    console.print(table)


class StopRequest:
    """Remembers a SIGINT/SIGTERM so the loop can finish its step, save and exit cleanly."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum


def load_prompts(path: str) -> list[str]:
    p = Path(path)
    return [line.strip() for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def peak_memory_gib() -> float:
    """Peak memory of this process: CUDA allocations when CUDA ran, else the resident set size."""
    if torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return kib / 2**20


def write_summary(out: Path, **figures):
    """summary.json: how a run ended, finished or diverged (an interrupted run has none; a sweep reads it)."""
    if parallel.is_main():
        figures["peak_memory_gib"] = peak_memory_gib()
        (out / "summary.json").write_text(json.dumps(figures, indent=2))


# -----------------------------------------------------------------------------
# the run

def train(cfg: TrainConfig) -> dict:
    """Run training as configured; return a summary (final loss, val losses, wall time...).

    One run per --output-dir at a time: rank 0 holds its lock while the run lasts."""
    with run_dir.locked(Path(cfg.output_dir), owner=os.environ.get("RANK", "0") == "0"), \
            reference_path(cfg.reference):
        return run_training(cfg)


def run_training(cfg: TrainConfig) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from torch.utils.tensorboard import SummaryWriter

    device, dtype = resolve_device_and_dtype(cfg)
    if device == "cpu":
        keep_freed_memory()
    parallel.init(device, cfg.parallel_timeout)  # under torchrun: join the other ranks
    console = Console(stderr=True, quiet=not parallel.is_main())  # rank 0 speaks for all
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    if parallel.is_main():  # a fresh run needs a directory without another run's files (or --overwrite)
        remove_partial_checkpoints(out)  # left by a kill mid-save
        if not cfg.resume:
            run_dir.claim_fresh(out, cfg.overwrite)
    torch.manual_seed(cfg.seed)
    autocast = (torch.autocast(device_type=device, dtype=dtype) if dtype != torch.float32
                else nullcontext())

    # --- data: tokenized once, cached next to the run
    model_dir = resolve_model_dir(cfg.model)
    tok = data.load_tokenizer(model_dir, cfg.template)
    tokenize = lambda path: data.tokenize_file(path, tok, cfg.max_seq_len, cfg.mask)  # cached on disk
    train_set = tokenize(cfg.data)
    console.print(f"data: {train_set.summary()}")
    val_data = cfg.val_data or (DEMO_VAL_DATA if Path(cfg.data) == DEMO_DATA else None)
    if val_data:
        train_examples, val_examples = train_set.examples, tokenize(val_data).examples
    else:
        train_examples, val_examples = data.split_validation(train_set.examples, cfg.val_fraction, cfg.seed)
    if not train_examples:
        raise TrainError(f"--data {cfg.data}: no training examples left")
    lengths = [len(e["input_ids"]) for e in train_examples]
    # A rank whose slice of a micro-batch is empty still takes part, on a batch that trains nothing.
    batch_of = lambda examples, idx, pack: to_device(data.make_batch(examples, idx, tok.pad_id, pack) if idx
                                                     else parallel.empty_batch(tok.pad_id), device)
    collate = lambda idx: batch_of(train_examples, idx, cfg.pack)
    val_step = cfg.micro_batch_size * parallel.world_size()  # under torchrun each rank takes a slice
    val_parts = [parallel.rank_share(list(range(len(val_examples)))[i:i + val_step], cfg.micro_batch_size)
                 for i in range(0, len(val_examples), val_step)]
    val_batches = [batch_of(val_examples, idx, False) for idx in val_parts]

    # --- the run's length, and what makes it this run; --resume checks both before the model loads
    n_micro = len(data.micro_batches(lengths, cfg.micro_batch_size * parallel.world_size(), cfg.seed, 0,
                                     cfg.group_by_length, cfg.pack, cfg.max_seq_len))  # global micro-batches
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * n_micro / cfg.grad_accum))
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    settings = {**asdict(cfg), "model_dir": str(model_dir), "device": device, "dtype": str(dtype),
                "world_size": parallel.world_size(), "total_steps": total_steps, "warmup_steps": warmup,
                "train_examples": len(train_examples), "val_examples": len(val_examples)}
    defining = run_dir.defining_settings(cfg, model_dir, val_data, dtype, parallel.world_size())
    step, epoch, index, changed = 0, 0, 0, {}
    checkpoints = list_checkpoints(out) if cfg.resume else []
    if cfg.resume and not checkpoints:
        raise TrainError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if checkpoints:
        step = read_trainer_state(checkpoints[-1])["step"]
        if step >= total_steps:
            raise TrainError(f"--resume: the run in {out} is at step {step} of {total_steps}: nothing left to "
                             "train; raise --max-steps (or --epochs) to train further")
        changed = run_dir.check_resume(out, defining, settings)

    # --- model: frozen base in the compute dtype, LoRA A and B in fp32
    # QLoRA: each linear becomes NF4 as it is read, so the full-precision model never exists whole.
    replace_linear = None
    if cfg.quantize:
        from lora.quant import nf4_loader
        replace_linear = nf4_loader(dtype)
    if parallel.shards_model(cfg.parallel):
        model = meta_model(model_dir, dtype)  # weights come after sharding: each rank reads its own
    else:
        model = load_model(model_dir, dtype=dtype, device=device, replace_linear=replace_linear)
    lora_cfg = lora.LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                               targets=cfg.lora_targets if cfg.lora_targets == "all-linear"
                               else [t.strip() for t in cfg.lora_targets.split(",") if t.strip()],
                               rslora=cfg.rslora)
    lora.inject_lora(model, lora_cfg, quantize=cfg.quantize, compute_dtype=dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    console.print(lora.trainable_table(model))
    model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()
    model.train()
    # --- parallel (torchrun only): the micro-steps call train_loss_fn, evaluation calls loss_fn.
    # DDP: a replica per rank, LoRA gradients summed over ranks. FSDP2: every decoder block and the
    # rest of the model sharded over the ranks, its parameters replaced by their shards (DTensors),
    # then each rank's shards read from the files.
    loss_fn = parallel.LossSum(model)  # forward(batch) -> (sum of token losses, trained tokens)
    train_loss_fn = parallel.wrap(loss_fn, cfg.parallel, device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # again: FSDP2 swapped them
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.cuda.reset_peak_memory_stats()  # max_memory_gib: the peak of training, not of loading

    # --- optimizer: AdamW on the trainable parameters only; no weight decay on biases and norms.
    # Fused: one kernel for all parameters (transformers' Trainer default too); on the CPU it takes
    # 3 ms a step for SmolLM2's 420 LoRA tensors, where the loop over them took 22.
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=betas(cfg), eps=cfg.adam_eps, amsgrad=cfg.amsgrad,
        fused=True)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)

    # --- resume: adapter, optimizer, scaler, RNG, data position and step from the newest checkpoint
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], model, optimizer, scaler)
        epoch, index = state["epoch"], state["index"]
        console.print(f"resumed from {checkpoints[-1]} (step {step})")
    if parallel.is_main():
        if checkpoints:
            run_dir.record_resume(out, step, changed)  # run_history.jsonl; metrics.jsonl cut to `step`
        else:
            run_dir.record_fresh(out, settings, defining)  # run_config.json
    metrics, writer = parallel.Silent(), parallel.Silent()  # only rank 0 writes them
    if parallel.is_main():
        metrics = (out / "metrics.jsonl").open("a" if checkpoints else "w")
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=step if checkpoints else None)
    prompts = load_prompts(cfg.sample_prompts)[:3]
    save = lambda s: save_checkpoint(out, s, model, lora_cfg, str(cfg.model), optimizer, scaler,
                                     {"epoch": epoch, "index": index}, cfg.keep_checkpoints)

    replies = []  # the newest sample replies; the final ones go into summary.json

    def run_eval(s):
        row = evaluate(loss_fn, val_batches, autocast) if val_batches else {}
        for k, v in row.items():
            writer.add_scalar(f"eval/{k}", v, s)
        replies[:] = sample_replies(model, tok, prompts, cfg.sample_tokens, autocast)
        for prompt, reply in zip(prompts, replies):
            writer.add_text(f"samples/{prompt[:40]}", reply, s)
        return row

    summary = {"first_val": run_eval(step) if not checkpoints else {}, "losses": []}
    skipped_in_a_row = 0  # fp16 steps GradScaler skipped in a row (their gradients overflowed)
    if summary["first_val"]:
        metrics.write(json.dumps({"step": step, **summary["first_val"]}) + "\n")
        console.print(f"step {step}: val_loss {summary['first_val']['val_loss']:.4f}")

    # --- the loop: one iteration is one optimizer step of grad_accum micro-batches
    stream = micro_batch_stream(lengths, cfg, epoch, index)
    stop = StopRequest()
    progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, transient=False, disable=not parallel.is_main())
    task = progress.add_task("train", total=total_steps, completed=step, info="")
    progress.start()
    while step < total_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg, total_steps, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Collate the whole step first: the loss is normalised by the trained tokens of all of it.
        batches = []
        for _ in range(cfg.grad_accum):
            epoch, index, idx = next(stream)
            batches.append(collate(idx))
        # Token counts were taken on the CPU (to_device): the step waits for the device once, below.
        trained_tokens = sum(b["n_trained"] for b in batches)
        tokens = sum(b["n_tokens"] for b in batches)
        trained_tokens, tokens = parallel.all_reduce_sum(trained_tokens, tokens)  # of all ranks

        loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per micro-batch
        for i, batch in enumerate(batches):
            # Under torchrun the gradients are summed over ranks once, after the last micro-batch.
            with parallel.gradient_sync(train_loss_fn, enabled=i == len(batches) - 1):
                loss, _ = forward_loss(train_loss_fn, batch, autocast)
                scaler.scale(loss / trained_tokens).backward()  # sum / step's tokens: accumulation-exact
            loss_sum += loss.detach()

        scaler.unscale_(optimizer)  # true gradients, before clipping and before they are logged
        grad_norm = clip_gradients(trainable, cfg.max_grad_norm)  # the norm before clipping, logged
        before = ({f"{n}.{k}": parallel.full(getattr(m, f"lora_{k}").weight.detach()).clone()
                   for n, m in model.named_modules() if isinstance(m, lora.LoRALinear) for k in "AB"}
                  if cfg.debug_grads else None)
        loss_scale = scaler.get_scale() if scaler.is_enabled() else None  # the scale this step used
        scaler.step(optimizer)  # fp16: skipped if a gradient overflowed (GradScaler checks, and syncs)
        scaler.update()
        loss_sum, grad_norm = torch.stack([loss_sum, grad_norm.float()]).tolist()  # the step's one sync
        step_loss = parallel.all_reduce_sum(loss_sum)[0] / trained_tokens
        # fp16: an overflowing gradient is expected now and then; GradScaler skipped that update and
        # halved the scale. A non-finite loss (the forward itself) is never that, in any precision,
        # and neither is a scale halved max_skipped_steps times in a row. A diverged update of A
        # and B is never saved: the run stops here, the last good checkpoint kept.
        skipped = scaler.is_enabled() and not math.isfinite(grad_norm)
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        if not math.isfinite(step_loss) or (not math.isfinite(grad_norm) and (
                not scaler.is_enabled() or skipped_in_a_row >= cfg.max_skipped_steps)):
            message = divergence_message(model, step + 1, step_loss, grad_norm, skipped_in_a_row, loss_scale)
            write_summary(out, diverged=True, steps=step, error=message, wall_s=time.perf_counter() - t_start)
            raise FloatingPointError(message)
        if cfg.debug_grads:  # before zero_grad: the gradients are still there to read
            rows = grad_report(model, before)
            print_grad_table(console, step + 1, rows)
            for name, ga, gb, ra, rb in rows:
                writer.add_scalars(f"grads/{name}", {"grad_A": ga, "grad_B": gb, "update_A": ra,
                                                     "update_B": rb}, step + 1)
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # --- log, evaluate, checkpoint
        dt = time.perf_counter() - t0
        row = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
               "trained_tokens": trained_tokens, "tokens_per_s": tokens / dt,
               "elapsed_s": time.perf_counter() - t_start, "epoch": epoch}
        if scaler.is_enabled():
            row.update(loss_scale=loss_scale, skipped=skipped)  # a skipped step did not update A, B
        if device == "cuda":
            row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if cfg.eval_every and step % cfg.eval_every == 0 or step == total_steps:
            row.update(run_eval(step))
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        for k in ("loss", "lr", "grad_norm", "tokens_per_s", "max_memory_gib", "loss_scale"):
            if k in row:
                writer.add_scalar(f"train/{k}", row[k], step)
        summary["losses"].append(step_loss)
        info = f"loss {step_loss:.4f}  lr {lr:.2e}  grad {grad_norm:.3f}  {row['tokens_per_s']:.0f} tok/s"
        progress.update(task, completed=step, info=info)
        if cfg.log_every and step % cfg.log_every == 0 and not console.is_terminal:
            console.print(f"step {step}/{total_steps}  {info}" +
                          (f"  val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""))
        stopping = parallel.any_rank(stop.signal is not None)  # every rank stops after the same step
        if cfg.save_every and step % cfg.save_every == 0 or step == total_steps or stopping:
            save(step)
        if stopping:
            progress.stop()
            signum = stop.signal or signal.SIGTERM
            console.print(f"stopped by signal {signum} after step {step}; checkpoint saved, "
                          f"continue with --resume")
            sys.exit(128 + signum)
    progress.stop()

    parallel.save_adapter(model, lora_cfg, out / "adapter", str(cfg.model))  # gathered, rank 0 writes
    writer.close()
    metrics.close()
    summary.update(last_val={k: row[k] for k in ("val_loss", "val_ppl") if k in row},
                   wall_s=time.perf_counter() - t_start, steps=step, model=model)
    write_summary(out, diverged=False, steps=step, final_loss=step_loss, **summary["last_val"],
                  wall_s=summary["wall_s"], replies=dict(zip(prompts, replies)))
    console.print(f"done: {step} steps in {summary['wall_s']:.0f}s; adapter in {out / 'adapter'}; "
                  f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    parallel.shutdown()
    return summary


def run(argv=None):
    cfg = parse_config(argv)
    if cfg.sweep:
        sweep.run_sweep(cfg)  # one `python train.py` process per setting, then a table
    else:
        train(cfg)


@record  # under torchrun: an uncaught exception is reported by torchrun with its rank and traceback
def main(argv=None):
    """The boundary: bad input is one line and exit 2, a divergence exit 3, a second Ctrl-C exit 130."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    prog = f"train.py (rank {os.environ.get('RANK', '0')})" if several else "train.py"
    code = run_command(prog, run, argv, codes={FloatingPointError: 3})
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
