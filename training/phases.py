"""The phases of a run before its first step, in the order training/loop.py calls them: where and
how it runs (`start_run`), what the model's config bounds (`check_model_limits`), how many steps and
from where (`plan_steps`), the model with LoRA injected (`build_model`), the optimizer
(`build_optimizer`) and, with --resume, the checkpoint restored (`resume`).
"""

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
import lora
from model import Llama, LlamaConfig, load_model, resolve_model_dir
from model.load import meta_model
from model.loss import LanguageModelLoss
from model.runtime import (choose_device, choose_dtype, indexed_device, keep_freed_memory, reset_peak_memory,
                           slow_precision_note)

from . import dpo, grpo, kto, parallel, reference_free, run_dir
from .batches import TrainData
from .checkpoint import list_checkpoints, load_checkpoint, read_trainer_state, remove_partial_checkpoints
from .settings import DEMO_VALIDATION, PAIRED, TrainConfig, TrainError, betas


@dataclass
class Run:
    """Where and how this run executes: what every phase reads."""
    out: Path  # --output-dir
    model_dir: Path  # the base checkpoint, resolved (the demo imported, a hub id downloaded)
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype  # of the frozen base and of autocast; LoRA's A and B are always float32
    autocast: object  # torch.autocast in dtype, or nullcontext() for float32
    console: object  # rich Console; quiet on every rank but 0
    t_start: float
    elapsed_before: float = 0.0  # --resume: the checkpoint's elapsed_s, from which this run's clock goes on


def start_run(cfg: TrainConfig, starting_over: bool = False) -> Run:
    """Device and dtype, the other ranks joined (under torchrun), the output directory claimed.
    starting_over: a --resume of a run that stopped before its first step, begun again (said)."""
    from rich.console import Console
    device = choose_device(cfg.device)
    dtype = choose_dtype(cfg.precision, device)
    if device == "cpu":
        keep_freed_memory()
    parallel.init(device, cfg.parallel_timeout)  # under torchrun: join the other ranks
    console = Console(stderr=True, quiet=not parallel.is_main())  # rank 0 speaks for all
    if note := slow_precision_note(dtype, device):  # bf16/fp16 asked for on a CPU without them
        console.print(note, style="yellow", markup=False)
    if starting_over:
        console.print(f"--resume: the run in {cfg.output_dir} stopped before its first step; starting it over")
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    if parallel.is_main():  # a fresh run needs a directory without another run's files (or --overwrite)
        remove_partial_checkpoints(out)  # left by a kill mid-save
        if not cfg.resume:
            run_dir.claim_fresh(out, cfg.overwrite)
    torch.manual_seed(cfg.seed)
    autocast = torch.autocast(device_type=device, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return Run(out, resolve_model_dir(cfg.model), device, dtype, autocast, console, t_start)


def check_model_limits(cfg: TrainConfig, run: Run):
    """Settings the model's config bounds, refused before any data or weight is read: a row no
    longer than its context (max_position_embeddings), and a LoRA rank no larger than the smaller
    side of a target (min(in, out): there B A can already be any matrix, no longer low-rank)."""
    config = LlamaConfig.from_file(run.model_dir / "config.json")
    context = config.max_position_embeddings
    if cfg.max_seq_len > context:
        raise TrainError(f"--max-seq-len {cfg.max_seq_len}: more than the model's context (max_position_embeddings "
                         f"{context} in {run.model_dir / 'config.json'}); pass at most {context}")
    if cfg.offload_embeddings and config.tie_word_embeddings:
        raise TrainError(f"--offload-embeddings: {run.model_dir / 'config.json'} ties the embedding table to "
                         "lm_head, which needs it on the device")
    if cfg.init_adapter:  # trained on this base, by content (or --allow-other-base, with a warning)
        lora.adapter.check_base(init_adapter_dir(cfg), run.model_dir, cfg.allow_other_base)
    if cfg.eval_only:  # the adapter scored brings its own rank
        return
    with torch.device("meta"):  # the structure only: no memory, no weights
        model = Llama(config)
    targets = lora_config(cfg).targets
    sides = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and lora.inject.is_target(name, targets)}
    if sides:  # (targets that match nothing are refused when LoRA is injected)
        name = min(sides, key=lambda n: min(sides[n]))
        largest = min(sides[name])
        if cfg.lora_r > largest:
            raise TrainError(f"--lora-r {cfg.lora_r}: larger than {name} allows ({sides[name][0]} in, "
                             f"{sides[name][1]} out): the largest rank is {largest}, where B A is already a full-rank "
                             "update; LoRA's point is a rank far below it (8 to 64 is typical)")


def init_adapter_dir(cfg: TrainConfig) -> Path | None:
    """--init-adapter as an adapter directory (a run directory: its final adapter), or None."""
    return lora.adapter.resolve_adapter_dir(cfg.init_adapter) if cfg.init_adapter else None


def load_data(cfg: TrainConfig, run: Run) -> TrainData:
    """Tokenized (SFT: once, cached on disk next to the data), masked by --mask (preference objectives:
    each reply, as --mask last masks it), split into train and validation; the validation batches are
    made once, on the device."""
    # --eval-only: the adapter's template; --init-adapter: the one the run it comes from trained with
    tok = data.load_tokenizer(run.model_dir, cfg.template, cfg.adapter or init_adapter_dir(cfg))
    if cfg.objective in PAIRED:
        tokenize = lambda path: data.tokenize_pairs(path, tok, cfg.max_seq_len)
    elif cfg.objective == "kto":
        tokenize = lambda path: data.tokenize_unpaired(path, tok, cfg.max_seq_len)
    elif cfg.objective == "grpo":  # a prompt and its completion fit in a row of max_seq_len
        if parallel.launched_by_torchrun() and cfg.parallel == "fsdp":  # its ranks decode different prompts,
            # for different numbers of tokens, where FSDP's forwards must be the same on every rank
            raise TrainError("--objective grpo runs under torchrun with --parallel ddp, not fsdp (yet)")
        tokenize = lambda path: data.tokenize_prompts(path, tok, cfg.max_seq_len - cfg.max_new_tokens)
    else:
        tokenize = lambda path: data.tokenize_file(path, tok, cfg.max_seq_len, cfg.mask)
    val_file = cfg.val_data or DEMO_VALIDATION.get(Path(cfg.data).resolve())
    if cfg.eval_only and val_file:  # the held-out file alone: nothing trains
        train_examples, val_examples = [], tokenize(val_file).examples
    else:
        train_set = tokenize(cfg.data)
        run.console.print(f"data: {train_set.summary()}")
        if val_file:
            train_examples, val_examples = train_set.examples, tokenize(val_file).examples
        elif cfg.eval_only and cfg.val_fraction == 1:  # scoring all of --data
            train_examples, val_examples = [], train_set.examples
        else:
            train_examples, val_examples = data.split_validation(train_set.examples, cfg.val_fraction, cfg.val_seed)
    if not train_examples and not cfg.eval_only:
        raise TrainError(f"--data {cfg.data}: no training examples left")
    kind = {"kto": "unpaired", "grpo": "prompts"}.get(cfg.objective, "pairs" if cfg.objective in PAIRED else "rows")
    ds = TrainData(tok, train_examples, val_examples, val_file and str(val_file), [], cfg.pack,
                   kind, indexed_device(run.device))  # the batch prefetcher's thread copies there
    ds.make_val_batches(cfg.micro_batch_size)
    return ds


@dataclass
class Plan:
    """The run's length, and what makes it this run."""
    total_steps: int
    warmup: int
    settings: dict  # every resolved setting: run_config.json
    defining: dict  # what a resumed run must share with it
    changed: dict  # --resume: the settings that may change and did ({name: [before, now]})
    checkpoint: Path | None  # --resume: the newest checkpoint, to continue from


def plan_steps(cfg: TrainConfig, run: Run, ds: TrainData) -> Plan:
    """How many optimizer steps and warmup steps; with --resume, the checkpoint to continue from,
    checked against the run's settings before the model loads."""
    world = parallel.world_size()
    n_micro = len(data.micro_batches(ds.lengths, cfg.micro_batch_size * world, cfg.seed, 0,
                                     cfg.group_by_length, cfg.pack, cfg.max_seq_len))  # global micro-batches
    # GRPO: each step's prompts are sampled once and trained on for grpo_iterations steps
    per_batch = cfg.grpo_iterations if cfg.objective == "grpo" else 1
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * n_micro / cfg.grad_accum) * per_batch)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    settings = {**asdict(cfg), "model_dir": str(run.model_dir), "device": run.device, "dtype": str(run.dtype),
                "world_size": world, "total_steps": total_steps, "warmup_steps": warmup,
                "train_examples": len(ds.train), "val_examples": len(ds.val)}
    defining = run_dir.defining_settings(cfg, run.model_dir, ds.val_file, run.dtype, world)
    checkpoints = list_checkpoints(run.out) if cfg.resume else []
    if cfg.resume and not checkpoints:
        raise TrainError(f"--resume: no checkpoint in {run.out / 'checkpoints'}")
    changed = {}
    if checkpoints:
        step = read_trainer_state(checkpoints[-1])["step"]
        if step >= total_steps:
            raise TrainError(f"--resume: the run in {run.out} is at step {step} of {total_steps}: nothing left "
                             "to train; raise --max-steps (or --epochs) to train further")
        changed = run_dir.check_resume(run.out, defining, settings, run.model_dir)
    return Plan(total_steps, warmup, settings, defining, changed, checkpoints[-1] if checkpoints else None)


def adapter_side_files(run: Run, ds: TrainData, plan: Plan) -> dict[str, str]:
    """What goes beside every adapter the run saves: the tokenizer files with the template trained
    with, and the base it is trained on (path, fingerprint), for merge.py's and chat.py's check."""
    return {**data.tokenizer_files(run.model_dir, ds.tok),
            lora.adapter.BASE_FILE: lora.adapter.base_record(run.model_dir, plan.defining[run_dir.MODEL_KEY])}


def lora_config(cfg: TrainConfig) -> lora.LoRAConfig:
    targets = (cfg.lora_targets if cfg.lora_targets == "all-linear"
               else [t.strip() for t in cfg.lora_targets.split(",") if t.strip()])
    return lora.LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                           rslora=cfg.rslora, dora=cfg.dora)


def model_options(cfg: TrainConfig) -> dict:
    """What the model is built with for training (Llama's keyword arguments): they change how it
    trains, never what it computes."""
    return dict(grad_checkpointing=cfg.grad_checkpointing, neftune_alpha=cfg.neftune_alpha,
                offload_activations=cfg.offload_activations, tile_mlp=cfg.tile_mlp)


def build_model(cfg: TrainConfig, run: Run, lora_cfg: lora.LoRAConfig, resuming: bool):
    """The frozen base in the compute dtype with LoRA's A and B (float32) injected, in train mode;
    its loss as a module (forward(batch) -> (sum of token losses, trained tokens)); and the module
    the training micro-steps call: the same one in one process, under torchrun parallel.wrap's
    (DDP: a replica per rank, LoRA gradients summed over ranks; FSDP2: the model sharded, each
    rank then reading only its shards from the files)."""
    training = model_options(cfg)
    if parallel.shards_model(cfg.parallel):
        # weights come after sharding: each rank reads its own
        model = meta_model(run.model_dir, run.dtype, **training)
    else:
        # QLoRA: each linear becomes NF4 as it is read, so the full-precision model never exists whole.
        replace_linear = None
        if cfg.quantize:
            from lora.quant import nf4_loader
            replace_linear = nf4_loader(run.dtype)
        model = load_model(run.model_dir, dtype=run.dtype, device=run.device, replace_linear=replace_linear,
                           **training)
    lora.inject_lora(model, lora_cfg, quantize=cfg.quantize, compute_dtype=run.dtype)
    if cfg.offload_embeddings:  # the table to host memory: training/batches.py looks the rows up there
        if parallel.launched_by_torchrun():
            raise TrainError("--offload-embeddings runs in one process yet (DDP keeps a module on one device)")
        model.model.embed_tokens.to("cpu")
    if cfg.lora_init != "default" and not resuming:  # resumed: the checkpoint holds PiSSA's start
        lora.pissa_init_(lora.lora_modules(model), lora.pissa.niter_of(cfg.lora_init))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # A and B: their updates are tiny next to them, bf16 would round them away
    run.console.print(lora.trainable_table(model))
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()
    model.train()
    loss_fn = objective_loss(cfg, model)
    train_loss_fn = parallel.wrap(loss_fn, cfg.parallel, run.device) if parallel.launched_by_torchrun() else loss_fn
    if cfg.init_adapter:  # after FSDP's loading: the frozen adapter is not sharded, every rank holds it whole
        attach_init_adapter(cfg, model, run)
    if run.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    reset_peak_memory()  # max_memory_gib, max_reserved_gib and the summary's peaks: of training, not loading
    return model, loss_fn, train_loss_fn


def attach_init_adapter(cfg: TrainConfig, model, run: Run):
    """--init-adapter: the adapter attached, frozen, to the LoRA layers (lora/chain.py), and said."""
    init = lora.attach_init_adapter(model, init_adapter_dir(cfg))
    layers = [m for m in lora.lora_modules(model).values() if m.init_A is not None]
    frozen = sum(m.init_A.numel() + m.init_B.numel() for m in layers)
    run.console.print(f"--init-adapter {init_adapter_dir(cfg)}: rank {init.r} on {len(layers)} layers "
                      f"({frozen:,} parameters), frozen, in the policy and the reference; the adapter "
                      f"saved holds both (rank {init.r} + {cfg.lora_r})", markup=False, soft_wrap=True)


def objective_loss(cfg: TrainConfig, model) -> torch.nn.Module:
    """The model with --objective's loss as its forward (the reference policy, where there is one:
    this model with its adapter off)."""
    if cfg.objective == "dpo":
        return dpo.PreferenceLoss(model, cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_loss, cfg.dpo_rpo_alpha)
    if cfg.objective == "orpo":
        return reference_free.ORPOLoss(model, cfg.orpo_lambda)
    if cfg.objective == "simpo":
        return reference_free.SimPOLoss(model, cfg.simpo_beta, cfg.simpo_gamma)
    if cfg.objective == "kto":
        return kto.KTOLoss(model, cfg.kto_beta, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
    if cfg.objective == "grpo":
        return grpo.GRPOLoss(model, cfg.grpo_epsilon, cfg.grpo_beta, cfg.grpo_norm, cfg.temperature)
    return LanguageModelLoss(model)


def reference_logps(loss_fn, ds: TrainData, cfg: TrainConfig, run: Run, resuming: bool):
    """--precompute-ref: every example's reference log-probs, once, before the first step (a step
    then runs one forward, not two), kept in the run directory for --resume (dpo.cached_reference)."""
    dpo.cached_reference(loss_fn, ds.train, ds.val, run.out / dpo.REFERENCE_FILE, resuming,
                         lambda examples, idx: ds.batch(idx, examples), cfg.micro_batch_size, run.autocast, run.console)
    ds.make_val_batches(cfg.micro_batch_size)  # now with the reference log-probs


def build_optimizer(cfg: TrainConfig, model, device: str, dtype: torch.dtype):
    """AdamW on the trainable parameters only, no weight decay on biases and norms; fused (one
    kernel for all parameters, as transformers' Trainer does by default), since a loop over the
    hundreds of small LoRA tensors costs more than the update itself. And the loss scaler, on
    for fp16 only (bf16 has fp32's range).

    LoRA+ (Hayou et al. 2024, --loraplus-lr-ratio): B learns at ratio x lr and A at lr (the paper:
    in wide models one rate for both learns features inefficiently); 1-D trainables go with B, as
    the LoRA+ reference code and PEFT's create_loraplus_optimizer put them. A group's `lr_ratio`
    is what the schedule multiplies."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = cfg.loraplus_lr_ratio
    on_b = {n for n, p in named if ratio != 1 and (".lora_B." in n or p.ndim == 1)}

    def group(at_ratio: bool, matrices: bool) -> dict:
        params = [p for n, p in named if (n in on_b) == at_ratio and (p.ndim >= 2) == matrices]
        return {"params": params, "weight_decay": cfg.weight_decay if matrices else 0.0,
                "lr": cfg.lr * (ratio if at_ratio else 1.0), "lr_ratio": ratio if at_ratio else 1.0}

    groups = [group(False, True), group(False, False)] + ([group(True, True), group(True, False)] if on_b else [])
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas(cfg), eps=cfg.adam_eps, amsgrad=cfg.amsgrad,
                                  fused=True)
    return optimizer, torch.amp.GradScaler(device, enabled=dtype == torch.float16)


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the data position after them (epoch, next
    micro-batch), which a checkpoint saves and --resume restores."""
    step: int = 0
    epoch: int = 0
    index: int = 0


def resume(checkpoint: Path, model, optimizer, scaler, run: Run) -> Position:
    """Adapter, optimizer, scaler and RNG states restored from the checkpoint; its position."""
    state = load_checkpoint(checkpoint, model, optimizer, scaler)
    step = read_trainer_state(checkpoint)["step"]
    run.console.print(f"resumed from {checkpoint} (step {step})")
    run.elapsed_before = run_dir.elapsed_at(run.out, step)
    return Position(step, state["epoch"], state["index"])
