"""LoRA / QLoRA fine-tuning of a Llama-family model, one loop read top to bottom.

    python train.py                          # the embedded demo: SmolLM2-135M-Instruct, sample data
    python train.py --model deepseek-ai/deepseek-llm-7b-chat --data emollm.json \\
        --micro-batch-size 2 --grad-accum 8 --precision bf16 --grad-checkpointing
    python train.py --config run.toml --lr 1e-4   # a config file; flags win
    python train.py --eval-only --adapter runs/emollm --val-data test.json   # score only

The update, per optimizer step, is that of Hu et al. (2021): only the low-rank A and B of each
target linear layer train (h = W0 x + (alpha / r) B A x), the base model stays frozen. The loss of a
step is the sum of the token losses of all its micro-batches divided by the number of trained
tokens in the whole step, so micro-batch 4 x accumulation 1 gives the same update as 1 x 4.

The file reads in the order a run happens. The settings (settings.py: TrainConfig, checked before
any work) go through named phases, each a function below: `start_run` (device, dtype, output
directory), `check_model_limits` (what the model's config bounds), `load_data`, `plan_steps` (how
many steps; with --resume, where to continue), `build_model` (the frozen base, LoRA injected),
`build_optimizer`. Then `run_training`'s loop: per optimizer step,
`train_step` (micro-batches, backward, clip, update), logging, `evaluate`, `save_checkpoint`; the
steps' micro-batches are collated a step or two ahead, on a thread of their own (`step_batches`).
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

import data
import dpo
import lora
import memory_estimate
import parallel
import run_dir
import sweep
from checkpoint import (list_checkpoints, load_checkpoint, read_trainer_state, remove_partial_checkpoints,
                        save_checkpoint)
from model import Llama, LlamaConfig, load_model, resolve_model_dir
from model.errors import run_command
from model.fused import reference_path
from model.generate import generate
from model import llama as model_module
from model.llama import PackedDocuments, packed_documents
from model.load import meta_model
from model.loss import IGNORE_INDEX, LanguageModelLoss, trained_positions
from model.runtime import (choose_device, choose_dtype, indexed_device, keep_freed_memory, peak_memory_gib,
                           peak_reserved_gib, reset_peak_memory, slow_precision_note)
from settings import DEMO_VALIDATION, TrainConfig, TrainError, betas, memory_budget, parse_config


# -----------------------------------------------------------------------------
# the run: its phases, then the loop

def train(cfg: TrainConfig) -> dict:
    """Run training as configured; return a summary (final loss, val losses, wall time...).

    One run per --output-dir at a time: rank 0 holds its lock while the run lasts."""
    with run_dir.locked(Path(cfg.output_dir), owner=os.environ.get("RANK", "0") == "0"), \
            reference_path(cfg.reference):
        return run_training(cfg)


def run_training(cfg: TrainConfig) -> dict:
    starting_over = cfg.resume and run_dir.never_stepped(Path(cfg.output_dir))
    if starting_over:  # stopped before its first step: no checkpoint to continue from, so step 0
        cfg = replace(cfg, resume=False)
    run = start_run(cfg)
    if starting_over:
        run.console.print(f"--resume: the run in {run.out} stopped before its first step; starting it over")
    check_model_limits(cfg, run)
    ds = load_data(cfg, run)
    tokenizer_files = data.tokenizer_files(run.model_dir, ds.tok)  # and the template: beside every adapter
    plan = plan_steps(cfg, run, ds)
    # beside every adapter too: the base it is trained on (path, fingerprint), for merge.py's and chat.py's check
    adapter_files = {**tokenizer_files,
                     lora.adapter.BASE_FILE: lora.adapter.base_record(run.model_dir, plan.defining[run_dir.MODEL_KEY])}
    lora_cfg = lora_config(cfg)
    model, loss_fn, train_loss_fn = build_model(cfg, run, lora_cfg, resuming=plan.checkpoint is not None)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after FSDP2 swapped them for shards
    optimizer, scaler = build_optimizer(cfg, model, run.device, run.dtype)
    if cfg.dpo_precompute_ref:
        reference_logps(loss_fn, ds, cfg, run, resuming=plan.checkpoint is not None)
    pos = resume(plan.checkpoint, model, optimizer, scaler, run) if plan.checkpoint else Position()
    logs = run_dir.RunLog(run.out, run.console, plan.total_steps, cfg.log_every, pos.step if plan.checkpoint else None,
                          plan.settings, plan.defining, plan.changed)
    prompts = sample_prompts(cfg, ds)
    evaluation = lambda: evaluate_and_sample(loss_fn, model, ds, prompts, cfg, run.autocast)
    first_val = {} if plan.checkpoint else logs.first_eval(pos.step, *evaluation())
    losses, row, streak = [], first_val, 0  # streak: fp16 steps skipped in a row

    # --- the loop: one iteration is one optimizer step of grad_accum micro-batches
    stop, bar = StopRequest(), ProgressBar(run.console, plan.total_steps, pos.step)
    batches_ahead = step_batches(ds, cfg, pos.epoch, pos.index, plan.total_steps - pos.step)
    with data.Prefetcher(batches_ahead) as steps:  # collated on a thread, ahead of the steps
        while pos.step < plan.total_steps:
            t0 = time.perf_counter()
            lr = lr_at(pos.step, cfg, plan.total_steps, plan.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+: B's groups at ratio x lr
            pos.epoch, pos.index, batches = next(steps)  # this step's micro-batches; the position after them
            before = lora_weights(model) if cfg.debug_grads else None  # for |dA|/|A|, |dB|/|B|
            result = train_step(train_loss_fn, batches, optimizer, scaler, trainable, cfg.max_grad_norm,
                                run.autocast, loss_fn.STATS)
            streak = streak + 1 if result.skipped else 0
            check_finite(result, streak, cfg, model, run, pos.step + 1)  # stops a diverged run, before saving
            pos.step += 1
            if cfg.debug_grads:  # the step's gradients are still there to read: zero_grad comes next step
                logs.grads(pos.step, grad_report(model, before))

            # --- log, evaluate, checkpoint
            row = result.row(pos.step, lr, time.perf_counter() - t0, run, pos.epoch)
            if cfg.eval_every and pos.step % cfg.eval_every == 0 or pos.step == plan.total_steps:
                row.update(logs.eval(pos.step, *evaluation()))
            logs.step(row)
            losses.append(result.loss)
            bar.update(pos.step, row)
            stopping = parallel.any_rank(stop.signal is not None)  # every rank stops after the same step
            if cfg.save_every and pos.step % cfg.save_every == 0 or pos.step == plan.total_steps or stopping:
                save_checkpoint(run.out, pos.step, model, lora_cfg, str(cfg.model), optimizer, scaler,
                                {"epoch": pos.epoch, "index": pos.index}, cfg.keep_checkpoints, adapter_files)
            if stopping:
                bar.stop()
                signum = stop.signal or signal.SIGTERM
                run.console.print(f"stopped by signal {signum} after step {pos.step}; checkpoint saved, "
                                  "continue with --resume")
                sys.exit(128 + signum)
    bar.stop()

    # gathered, rank 0 writes
    parallel.save_adapter(model, lora_cfg, run.out / "adapter", str(cfg.model), adapter_files)
    logs.close()
    last_val = {k: v for k, v in row.items() if k.startswith("val_")}
    wall_s = time.perf_counter() - run.t_start
    run_dir.write_summary(run.out, diverged=False, steps=pos.step, final_loss=losses[-1] if losses else None,
                  **last_val, wall_s=wall_s, replies=logs.replies)
    run.console.print(f"done: {pos.step} steps in {wall_s:.0f}s; adapter in {run.out / 'adapter'}; "
                      f"TensorBoard: tensorboard --logdir {run.out / 'tensorboard'}")
    parallel.shutdown()
    return {"first_val": first_val, "losses": losses, "last_val": last_val, "wall_s": wall_s, "steps": pos.step,
            "model": model}


# -----------------------------------------------------------------------------
# the phases, in the order run_training calls them

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


def start_run(cfg: TrainConfig) -> Run:
    """Device and dtype, the other ranks joined (under torchrun), the output directory claimed."""
    from rich.console import Console
    device = choose_device(cfg.device)
    dtype = choose_dtype(cfg.precision, device)
    if device == "cpu":
        keep_freed_memory()
    parallel.init(device, cfg.parallel_timeout)  # under torchrun: join the other ranks
    console = Console(stderr=True, quiet=not parallel.is_main())  # rank 0 speaks for all
    if note := slow_precision_note(dtype, device):  # bf16/fp16 asked for on a CPU without them
        console.print(note, style="yellow", markup=False)
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


@dataclass
class TrainData:
    """The tokenized examples, and the batches the steps and evaluation read."""
    tok: data.ChatTokenizer
    train: list[dict]  # SFT: {"input_ids", "labels"} per example; DPO: a pair (data/preference.py)
    val: list[dict]
    val_file: str | None  # where val came from (None: held out of --data)
    val_batches: list[dict]  # on the device, this rank's share
    pack: bool
    pairs: bool  # --objective dpo: the examples are preference pairs
    device: torch.device  # with its index (cuda:1), for the batches made on the prefetcher's thread

    @property
    def lengths(self) -> list[int]:
        """Tokens per example (of a pair, its longer side: what its rows are padded to)."""
        if self.pairs:
            return [max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in self.train]
        return [len(e["input_ids"]) for e in self.train]

    def batch(self, idx: list[int], examples: list[dict] | None = None) -> dict:
        """Micro-batch of examples idx (of the training set, or of `examples`), on the device. A
        rank whose slice of a micro-batch is empty still takes part, on a batch that trains nothing."""
        examples = self.train if examples is None else examples
        if not idx:
            batch = parallel.empty_batch(self.tok.pad_id)
            if self.pairs:  # no pairs; and no reference forward if the others run none (FSDP: all or none)
                batch.update(pairs=0, **({"ref_logps": torch.zeros(1)} if "ref_chosen" in examples[0] else {}))
        elif self.pairs:
            batch = data.make_pair_batch(examples, idx, self.tok.pad_id)
        else:  # idx of the training set under --pack names rows of examples; of validation, examples
            # (one per row: packing would give the same per-example losses, and it only saves time)
            batch = data.make_batch(examples, idx, self.tok.pad_id, self.pack and examples is self.train)
        return to_device(batch, self.device)

    def make_val_batches(self, micro_batch_size: int):
        """The validation batches, once, on the device (again after DPO's reference log-probs)."""
        step = micro_batch_size * parallel.world_size()  # under torchrun each rank takes a slice
        parts = [parallel.rank_share(list(range(len(self.val)))[i:i + step], micro_batch_size)
                 for i in range(0, len(self.val), step)]
        self.val_batches = [self.batch(idx, self.val) for idx in parts]


def load_data(cfg: TrainConfig, run: Run) -> TrainData:
    """Tokenized (SFT: once, cached on disk next to the data), masked by --mask (DPO: each reply of
    a pair, as --mask last masks it), split into train and validation; the validation batches are
    made once, on the device."""
    tok = data.load_tokenizer(run.model_dir, cfg.template, cfg.adapter)  # --eval-only: the adapter's template
    if cfg.objective == "dpo":
        tokenize = lambda path: data.tokenize_pairs(path, tok, cfg.max_seq_len)
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
    ds = TrainData(tok, train_examples, val_examples, val_file and str(val_file), [], cfg.pack,
                   cfg.objective == "dpo", indexed_device(run.device))  # the batch prefetcher's thread copies there
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
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * n_micro / cfg.grad_accum))
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


def lora_config(cfg: TrainConfig) -> lora.LoRAConfig:
    targets = (cfg.lora_targets if cfg.lora_targets == "all-linear"
               else [t.strip() for t in cfg.lora_targets.split(",") if t.strip()])
    return lora.LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                           rslora=cfg.rslora, dora=cfg.dora)


def build_model(cfg: TrainConfig, run: Run, lora_cfg: lora.LoRAConfig, resuming: bool):
    """The frozen base in the compute dtype with LoRA's A and B (float32) injected, in train mode;
    its loss as a module (forward(batch) -> (sum of token losses, trained tokens)); and the module
    the training micro-steps call: the same one in one process, under torchrun parallel.wrap's
    (DDP: a replica per rank, LoRA gradients summed over ranks; FSDP2: the model sharded, each
    rank then reading only its shards from the files)."""
    if parallel.shards_model(cfg.parallel):
        model = meta_model(run.model_dir, run.dtype)  # weights come after sharding: each rank reads its own
    else:
        # QLoRA: each linear becomes NF4 as it is read, so the full-precision model never exists whole.
        replace_linear = None
        if cfg.quantize:
            from lora.quant import nf4_loader
            replace_linear = nf4_loader(run.dtype)
        model = load_model(run.model_dir, dtype=run.dtype, device=run.device, replace_linear=replace_linear)
    lora.inject_lora(model, lora_cfg, quantize=cfg.quantize, compute_dtype=run.dtype)
    if cfg.lora_init != "default" and not resuming:  # resumed: the checkpoint holds PiSSA's start
        lora.pissa_init_(lora.lora_modules(model), lora.pissa.niter_of(cfg.lora_init))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # A and B: their updates are tiny next to them, bf16 would round them away
    run.console.print(lora.trainable_table(model))
    model.grad_checkpointing = cfg.grad_checkpointing
    model.neftune_alpha = cfg.neftune_alpha
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()
    model.train()
    if cfg.objective == "dpo":  # the reference policy: this model with its adapter off
        loss_fn = dpo.PreferenceLoss(model, cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_loss, cfg.dpo_rpo_alpha)
    else:
        loss_fn = LanguageModelLoss(model)
    train_loss_fn = parallel.wrap(loss_fn, cfg.parallel, run.device) if parallel.launched_by_torchrun() else loss_fn
    if run.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    reset_peak_memory()  # max_memory_gib, max_reserved_gib and the summary's peaks: of training, not loading
    return model, loss_fn, train_loss_fn


def reference_logps(loss_fn: dpo.PreferenceLoss, ds: TrainData, cfg: TrainConfig, run: Run, resuming: bool):
    """--dpo-precompute-ref: every pair's reference log-probs, once, before the first step (a step
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


# -----------------------------------------------------------------------------
# one optimizer step, and what the loop does around it

@dataclass
class Step:
    """What one optimizer step measured."""
    loss: float  # sum of token losses / trained tokens, over the whole step and all ranks
    grad_norm: float  # the global norm of the LoRA gradients, before clipping
    tokens: int  # tokens in the step (padding excluded), all ranks
    trained_tokens: int  # of which trained (SFT: the loss's denominator; DPO: the replies' tokens, over pairs)
    loss_scale: float | None  # fp16: the scale GradScaler used this step
    skipped: bool  # fp16: GradScaler skipped the update, a gradient having overflowed
    stats: dict  # DPO: rewards, reward accuracy and margin, log-probs (means over the step's pairs)

    def row(self, step: int, lr: float, seconds: float, run: Run, epoch: int) -> dict:
        """The step's line of metrics.jsonl."""
        row = {"step": step, "loss": self.loss, "lr": lr, "grad_norm": self.grad_norm, "tokens": self.tokens,
               "trained_tokens": self.trained_tokens, "tokens_per_s": self.tokens / seconds,
               "elapsed_s": run.elapsed_before + time.perf_counter() - run.t_start, "epoch": epoch}
        row.update(self.stats)
        if self.loss_scale is not None:
            row.update(loss_scale=self.loss_scale, skipped=self.skipped)  # a skipped step did not update A, B
        if run.device == "cuda":  # allocated, and held by the caching allocator (what the GPU needs free)
            row.update(max_memory_gib=peak_memory_gib(), max_reserved_gib=peak_reserved_gib())
        return row


def train_step(loss_fn, batches, optimizer, scaler, params, max_grad_norm: float, autocast,
               stat_names: tuple = ()) -> Step:
    """One optimizer step: forward and backward of each micro-batch, the gradients accumulating;
    then unscaled (fp16), clipped, and applied. The gradients stay until the next step's zero_grad,
    so the caller can read them (--debug-grads, and the module named when one is not finite).

    The loss is a mean over the whole step (all micro-batches, all ranks) of what each batch's
    n_loss counts: trained tokens (SFT) or preference pairs (DPO). A loss module with stat_names
    (DPO's) returns their sums beside the loss; the step reports their means."""
    optimizer.zero_grad(set_to_none=True)
    # Counts were taken on the CPU (to_device) and are summed over ranks there (gloo): the step
    # waits for the device once, below.
    n_loss, trained_tokens, tokens = parallel.all_reduce_sum(*(sum(b[k] for b in batches)
                                                               for k in ("n_loss", "n_trained", "n_tokens")))
    sums = accumulate(loss_fn, batches, scaler, autocast, n_loss, stat_names)
    grad_norm, loss_scale = update(optimizer, scaler, params, max_grad_norm)
    loss_sum, *stat_sums, grad_norm = torch.cat([sums, grad_norm.float()[None]]).tolist()  # the step's one sync
    stats = mean_stats(stat_names, stat_sums, n_loss)
    return Step(loss_sum / n_loss, grad_norm, tokens, trained_tokens, loss_scale,
                skipped=scaler.is_enabled() and not math.isfinite(grad_norm), stats=stats)


def accumulate(loss_fn, batches, scaler, autocast, n_loss: int, stat_names: tuple = ()) -> torch.Tensor:
    """The forward and backward of each of a step's micro-batches, the gradients accumulating;
    -> (1 + len(stat_names),): the sum of the losses and of the stats, over all ranks, on the device."""
    device = batches[0]["input_ids"].device
    loss_sum = torch.zeros((), device=device)  # on the device: no sync per micro-batch
    stat_sums = torch.zeros(len(stat_names), device=device)
    for i, batch in enumerate(batches):
        # Under torchrun the gradients are summed over ranks once, after the last micro-batch.
        with parallel.gradient_sync(loss_fn, enabled=i == len(batches) - 1):
            loss, extra = forward_loss(loss_fn, batch, autocast)
            scaler.scale(loss / n_loss).backward()  # sum / the step's count: accumulation-exact
        loss_sum += loss.detach()
        if stat_names:
            stat_sums += extra.detach().float()
    return parallel.all_reduce_tensor(torch.cat([loss_sum[None], stat_sums]))  # over ranks, on the device


def update(optimizer, scaler, params, max_grad_norm: float) -> tuple[torch.Tensor, float | None]:
    """The accumulated gradients unscaled (fp16), clipped and applied; -> the norm before clipping
    (a 0-dim tensor, not read), and the loss scale this step used (fp16) or None."""
    scaler.unscale_(optimizer)  # true gradients, before clipping and before they are logged
    grad_norm = clip_gradients(params, max_grad_norm)  # the norm before clipping, logged
    loss_scale = scaler.get_scale() if scaler.is_enabled() else None  # the scale this step used
    scaler.step(optimizer)  # fp16: skipped if a gradient overflowed (GradScaler checks, and syncs)
    scaler.update()
    return grad_norm, loss_scale


def mean_stats(names, sums, n: int, prefix: str = "") -> dict:
    """DPO's metrics: the sums over n pairs as means, and the reward margin."""
    if not names:
        return {}
    return dpo.derived_metrics({f"{prefix}{k}": v / max(n, 1) for k, v in zip(names, sums)}, prefix)


def check_finite(step: Step, skipped_in_a_row: int, cfg: TrainConfig, model, run: Run, number: int):
    """Stop the run, before anything is saved, when step `number` diverged.

    fp16: an overflowing gradient is expected now and then; GradScaler skipped that update and
    halved the scale. A non-finite loss (the forward itself) is never that, in any precision, and
    neither is a scale halved max_skipped_steps times in a row. A diverged update of A and B is
    never saved: the run stops here, the last good checkpoint kept."""
    fp16 = step.loss_scale is not None
    if math.isfinite(step.loss) and (math.isfinite(step.grad_norm) or
                                     fp16 and skipped_in_a_row < cfg.max_skipped_steps):
        return
    message = divergence_message(model, number, step.loss, step.grad_norm, skipped_in_a_row, step.loss_scale)
    run_dir.write_summary(run.out, diverged=True, steps=number - 1, error=message,
                          wall_s=time.perf_counter() - run.t_start)
    raise FloatingPointError(message)


def evaluate_and_sample(loss_fn, model, ds: TrainData, prompts, cfg: TrainConfig, autocast):
    """The validation loss (and perplexity), and greedy replies to the sample prompts."""
    row = evaluate(loss_fn, ds.val_batches, autocast) if ds.val_batches else {}
    return row, dict(zip(prompts, sample_replies(model, ds.tok, prompts, cfg.sample_tokens, autocast)))


def trained_tensors(m) -> dict:
    """A LoRA layer's trained tensors by short name: A, B and, for DoRA, the magnitude m."""
    return {"A": m.lora_A.weight, "B": m.lora_B.weight, **({"m": m.lora_magnitude_vector} if m.use_dora else {})}


def lora_weights(model) -> dict:
    """A copy of every LoRA A and B (and DoRA m; whole, under FSDP), for --debug-grads' update ratios."""
    return {f"{n}.{k}": parallel.full(p.detach()).clone()
            for n, m in lora.lora_modules(model).items() for k, p in trained_tensors(m).items()}


class ProgressBar:
    """The rich bar: step, loss, lr, grad norm, tokens/s, time left (rank 0 only)."""

    def __init__(self, console, total: int, done: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=False, disable=not parallel.is_main())
        self.task = self.progress.add_task("train", total=total, completed=done, info="")
        self.progress.start()

    def update(self, step: int, row: dict):
        self.progress.update(self.task, completed=step, info=run_dir.step_info(row))

    def stop(self):
        self.progress.stop()


# -----------------------------------------------------------------------------
# helpers of the steps: schedule, data stream, loss, evaluation, clipping, reports

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


def step_batches(ds: TrainData, cfg: TrainConfig, epoch: int, index: int, steps: int):
    """Yield (epoch, next index, micro-batches) for `steps` steps from the data position (epoch,
    index): each step's grad_accum micro-batches collated, counted and on the device (the whole step
    first: the loss is normalised by the trained tokens of all of it), and the position after them,
    which the step's checkpoint saves. run_training reads it through data.Prefetcher, on a thread of
    its own ahead of the steps, so the device never waits on collation; it draws no random numbers."""
    stream = micro_batch_stream(ds.lengths, cfg, epoch, index)
    for _ in range(steps):
        batches = []
        for _ in range(cfg.grad_accum):
            epoch, index, idx = next(stream)
            batches.append(ds.batch(idx))
        yield epoch, index, batches


def to_device(batch: dict, device) -> dict:
    """The batch on `device`, with what the step reads of it counted first, on the CPU (counted on
    a GPU, each would make the host wait): n_trained and n_tokens, n_loss (what the loss is a mean
    over), trained_index, the positions the loss gathers (model.loss.trained_positions), for
    packed rows the documents' bounds that varlen and per-document attention read (packed_documents),
    and for DPO's pairs the row of each trained position and the trained tokens of each row.

    On CUDA the tensors are pinned first (page-locked): only from there does a non_blocking copy
    leave the host free at once (from pageable memory CUDA stages it through a pinned buffer of its
    own, with the host waiting). `device` has its index: another thread's "cuda" may be another GPU."""
    batch = {**batch, "trained_index": trained_positions(batch["labels"])}
    if "document_ids" in batch:
        batch["documents"] = packed_documents(batch["document_ids"])
    counts = {"n_trained": batch["trained_index"].numel(), "n_tokens": int(batch["attention_mask"].sum())}
    counts["n_loss"] = counts["n_trained"]  # what the loss is a mean over: trained tokens...
    if "pairs" in batch:  # ...or, for DPO, preference pairs; and each trained position's row
        counts["n_loss"] = counts["pairs"] = batch.pop("pairs")
        batch["trained_rows"] = batch["trained_index"] // batch["labels"].shape[1]
        batch["reply_tokens"] = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)  # (2B,): IPO's averages
    if pins_memory(device):
        batch = {k: pinned(v) for k, v in batch.items()}
    return {**{k: v.to(device, non_blocking=True) for k, v in batch.items()}, **counts}


def pins_memory(device) -> bool:
    """Whether batches for `device` are pinned before their copy: on CUDA (on the CPU there is no
    copy, and pin_memory needs an accelerator)."""
    return torch.device(device).type == "cuda"


def pinned(value):
    """A tensor in page-locked memory; of PackedDocuments, its cu_seqlens (the tensor it holds)."""
    if isinstance(value, PackedDocuments):
        return value._replace(cu_seqlens=value.cu_seqlens.pin_memory())
    return value.pin_memory()


def forward_loss(loss_fn, batch, autocast):
    """Sum of token losses of one micro-batch (fp32) and its trained-token count.

    loss_fn is the model with lm_loss_sum as its forward (model.loss.LanguageModelLoss), under
    torchrun maybe wrapped in DDP."""
    with autocast:
        return loss_fn(batch)


@torch.no_grad()
def evaluate(loss_fn, batches, autocast) -> dict:
    """Validation loss (the mean over trained tokens, or DPO's over pairs, of all ranks' batches)
    and perplexity (SFT), or DPO's rewards, reward accuracy and margin."""
    loss_fn.eval()
    names = loss_fn.STATS
    total, n, stat_sums = 0.0, 0, [0.0] * len(names)
    for batch in batches:
        loss, extra = forward_loss(loss_fn, batch, autocast)
        total, n = total + loss.item(), n + batch["n_loss"]
        stat_sums = [a + b for a, b in zip(stat_sums, extra.tolist())] if names else stat_sums
    total, n, *stat_sums = parallel.all_reduce_sum(total, n, *stat_sums)
    loss_fn.train()
    val_loss = total / max(n, 1)
    if names:
        return {"val_loss": val_loss, **mean_stats(names, stat_sums, n, prefix="val_")}
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


@torch.no_grad()
def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most max_norm (0: leave them), as
    clip_grad_norm_ does, and return the norm before clipping as a 0-dim tensor, with no host
    sync: foreach kernels, the scale factor applied on the device.

    A non-finite norm leaves the gradients as they are, so the module that made it can be named
    (the caller stops the run, or under fp16 GradScaler skips the update). Under FSDP the
    gradients are shards (DTensors): their norm is combined over the ranks (parallel.full, an
    all-reduce on the device) and the factor multiplies each shard's local tensor, as in one process."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = any(parallel.is_shard(g) for g in grads)
    norms = [torch.linalg.vector_norm(g) for g in grads] if sharded else torch._foreach_norm(grads)
    norm = parallel.full(torch.linalg.vector_norm(torch.stack(norms)))
    if max_norm > 0:
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s factor
        factor = torch.where(torch.isfinite(norm), factor, torch.ones_like(factor))
        local = [g.to_local() if parallel.is_shard(g) else g for g in grads]  # views of the shards' storage
        torch._foreach_mul_(local, factor)
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


def grad_report(model, before: dict) -> list[tuple[str, dict]]:
    """(module, {grad_A: |grad A|, grad_B, update_A: |dA|/|A|, update_B, and for DoRA grad_m,
    update_m}) for every LoRA module (--debug-grads); whole tensors, under FSDP."""
    rows = []
    for name, m in lora.lora_modules(model).items():
        tensors = {k: (parallel.full(p.detach()), p.grad) for k, p in trained_tensors(m).items()}
        figures = {f"grad_{k}": parallel.full(g).norm().item() if g is not None else 0.0
                   for k, (_, g) in tensors.items()}
        figures.update({f"update_{k}": ((p - before[f"{name}.{k}"]).norm() / p.norm().clamp_min(1e-12)).item()
                        for k, (p, _) in tensors.items()})
        rows.append((name, figures))
    return rows


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


def sample_prompts(cfg: TrainConfig, ds: TrainData, n: int = 3) -> list[str]:
    """The n prompts answered at each evaluation: the first of --sample-prompts' file ('' none),
    or by default the first user turn of each of the first validation conversations, so that the
    samples show the run's own kind of question (no validation data: no samples)."""
    if cfg.sample_prompts is not None:
        return load_prompts(cfg.sample_prompts)[:n]
    source = ds.val_file or cfg.data  # validation examples know their record's line in it
    if ds.pairs:
        records = {line: prompt for line, (prompt, _, _) in data.preference.load_pairs(source)}
    else:
        records = dict(data.formats.load_conversations_with_lines(source))
    prompts = []
    for example in ds.val:
        user = [m["content"] for m in records[example["line"]] if m["role"] == "user"]
        if user and len(prompts) < n:
            prompts.append(user[0].strip())
    return prompts



# -----------------------------------------------------------------------------
# --eval-only: a run's closing evaluation, of any model or adapter, training nothing

def evaluate_only(cfg: TrainConfig) -> dict:
    """Score --model, with --adapter applied when given, on held-out data as the end of a run does:
    the mean loss over the trained tokens and the perplexity (DPO: the rewards against the reference,
    the adapter switched off, and their accuracy), and greedy replies to the sample prompts. The
    data is read as training reads it (--template, else the adapter's own; --mask; --max-seq-len):
    --val-data whole, else the share of --data that training holds out (--val-fraction, --val-seed;
    1: all of it). LoRA's A and B are float32 under autocast, as in training, so an adapter scores
    what its run's last evaluation measured. The report goes to stderr, one JSON object to stdout
    (for scripts); nothing is written.

    One process only: under torchrun each rank would score all of it."""
    from rich.console import Console
    from rich.progress import track
    if parallel.launched_by_torchrun():
        raise TrainError("--eval-only runs in one process: start it with python, not torchrun")
    device = choose_device(cfg.device)
    dtype = choose_dtype(cfg.precision, device)
    console = Console(stderr=True)
    if note := slow_precision_note(dtype, device):
        console.print(note, style="yellow", markup=False)
    model_dir = resolve_model_dir(cfg.model)
    if cfg.adapter:  # before any weight is read: the base it was trained on, by content
        lora.adapter.check_base(cfg.adapter, model_dir, cfg.allow_other_base)
    autocast = torch.autocast(device_type=device, dtype=dtype) if dtype != torch.float32 else nullcontext()
    run = Run(None, model_dir, device, dtype, autocast, console, time.perf_counter())
    check_model_limits(cfg, run)
    ds = load_data(cfg, run)
    if not ds.val:
        raise TrainError(f"--eval-only: no examples to score in {ds.val_file or cfg.data}")
    if note := data.tokenizer.template_warning(ds.tok, cfg.template, cfg.adapter):
        console.print(note, style="yellow", markup=False)
    model = eval_model(cfg, run)
    loss_fn = (dpo.PreferenceLoss(model, cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_loss, cfg.dpo_rpo_alpha)
               if cfg.objective == "dpo" else LanguageModelLoss(model))
    source = ds.val_file or cfg.data
    if not ds.val_file and cfg.val_fraction < 1:
        source += (f": the {cfg.val_fraction:g} that training holds out (--val-seed {cfg.val_seed}; "
                   "--val-fraction 1 scores all of it, --val-data FILE another file)")
    console.print(f"scoring {cfg.model}" + (f" with the adapter {cfg.adapter}" if cfg.adapter else "") +
                  f" on {len(ds.val)} {'pairs' if ds.pairs else 'examples'} of {source}", markup=False, soft_wrap=True)
    row = evaluate(loss_fn, track(ds.val_batches, description="scoring", console=console, transient=True), autocast)
    prompts = sample_prompts(cfg, ds)
    replies = dict(zip(prompts, sample_replies(model, ds.tok, prompts, cfg.sample_tokens, autocast)))
    counted = sum(b["n_loss"] for b in ds.val_batches)  # trained tokens (DPO: pairs)
    result = {"model": str(cfg.model), "model_dir": str(model_dir), "adapter": cfg.adapter,
              "data": str(ds.val_file or cfg.data), "examples": len(ds.val), "trained_tokens": counted,
              "dtype": str(dtype), **row, "replies": replies}
    figures = "  ".join(f"{k} {v:.4f}" for k, v in row.items())
    console.print(f"{figures}  ({counted} trained {'pairs' if ds.pairs else 'tokens'})", markup=False)
    for prompt, text in replies.items():
        console.print(f"> {prompt}", style="bold", markup=False)
        console.print(text, markup=False)
    print(json.dumps(result, ensure_ascii=False))
    return result


def eval_model(cfg: TrainConfig, run: Run):
    """The model scored: --model in the compute dtype (--quantize nf4: its linears NF4 as read), with
    --adapter loaded when given, its A and B (and DoRA's m) in float32 as its run trained them."""
    replace_linear = None
    if cfg.quantize:
        from lora.quant import nf4_loader
        replace_linear = nf4_loader(run.dtype)
    model = load_model(run.model_dir, dtype=run.dtype, device=run.device, replace_linear=replace_linear)
    if cfg.adapter:
        adapter_cfg = lora.read_adapter_config(cfg.adapter)
        if cfg.quantize:  # the adapter's layers around NF4 linears (load_adapter would inject plain ones)
            lora.inject_lora(model, adapter_cfg, quantize=cfg.quantize, compute_dtype=run.dtype)
        lora.load_adapter(model, cfg.adapter)
        for m in lora.lora_modules(model).values():
            for p in trained_tensors(m).values():
                p.data = p.data.float()
        _, metadata = lora.read_adapter_tensors(cfg.adapter, metadata_only=True)
        if metadata.get(lora.adapter.QUANT_KEY) == "nf4" and not cfg.quantize:
            run.console.print("note: the adapter was trained on an NF4 base (QLoRA); it is scored on the "
                              "full-precision one (--quantize nf4 scores it as trained)", style="yellow", markup=False)
    model.eval()
    return model


# -----------------------------------------------------------------------------
# --estimate-memory: the step's memory, counted on fake tensors (memory_estimate.py)

def estimate_command(cfg: TrainConfig) -> dict:
    """Count the memory of this run's training step without reading a weight or a data file, print
    it by category (with --memory-budget: whether it fits, and the largest micro-batch and length
    that do) and, with --json, one JSON object on stdout."""
    from rich.console import Console
    if parallel.launched_by_torchrun():
        raise TrainError("--estimate-memory runs in one process: start it with python, not torchrun")
    console = Console(stderr=True)
    device = "cuda" if cfg.device == "cuda" else choose_device(cfg.device)  # cuda: modelled, on any machine
    if cfg.precision == "auto" and device == "cuda" and not torch.cuda.is_available():
        dtype = torch.bfloat16  # what auto picks on a GPU of compute capability 8.0 or more
    else:
        dtype = choose_dtype(cfg.precision, device)
    model_dir = resolve_model_dir(cfg.model, config_only=True)
    config = LlamaConfig.from_file(model_dir / "config.json")
    check_model_limits(cfg, Run(None, model_dir, device, dtype, None, console, time.perf_counter()))
    est = estimate_step(cfg, config, device, dtype)
    result = est.as_dict()
    what = (f"{cfg.model}: micro-batch {cfg.micro_batch_size} x {cfg.max_seq_len} tokens, "
            f"{str(dtype).removeprefix('torch.')}{', NF4 base' if cfg.quantize else ''}, LoRA r {cfg.lora_r}"
            f"{', checkpointing' if cfg.grad_checkpointing else ''}{', DPO' if cfg.objective == 'dpo' else ''}, "
            f"on {device}{' (modelled)' if device == 'cuda' and not torch.cuda.is_available() else ''}")
    console.print(memory_estimate.table(est, what))
    console.print(f"every row full ({cfg.max_seq_len} tokens) and every token trained: the worst batch of these "
                  f"settings; counted in {est.seconds:.1f} s", markup=False)
    if cfg.memory_budget is not None:
        budget = memory_budget(cfg)
        total = lambda **kw: estimate_step(replace(cfg, **kw), config, device, dtype).total_bytes
        result.update(budget_bytes=budget, fits=est.total_bytes <= budget,
                      max_micro_batch_size=memory_estimate.largest(lambda b: total(micro_batch_size=b), budget,
                                                                   cfg.micro_batch_size, 1 << 16),
                      max_seq_len=memory_estimate.largest(lambda t: total(max_seq_len=t), budget, cfg.max_seq_len,
                                                          config.max_position_embeddings, low=2))
        console.print(memory_estimate.budget_line(result, cfg.micro_batch_size, cfg.max_seq_len), markup=False)
    if cfg.json:
        print(json.dumps(result))
    return result


def estimate_step(cfg: TrainConfig, config: LlamaConfig, device: str, dtype: torch.dtype) -> memory_estimate.Estimate:
    """The run's model built as build_model builds it, on the meta device from the config alone, then
    fake; its step (accumulate, update: the run's own functions) run twice on the worst batch of
    the settings: micro_batch_size rows of max_seq_len tokens, every one trained (DPO: as many pairs,
    both replies that long). The peak is that of the step, as torch.cuda.max_memory_allocated counts
    it after build_model's reset: weights, LoRA and optimizer state included, loading not.

    Two micro-batches per step stand for --grad-accum's (from the second on, the first's gradients
    are alive: more change nothing), two steps for the run's (AdamW's state exists from the
    first's update on). The fp16 loss scaler is left out (its state is two scalars; its step reads
    the device, which fake tensors cannot)."""
    t0 = time.perf_counter()
    mode = memory_estimate.LiveBytes(cuda=device == "cuda")
    with torch.device("meta"):
        model = Llama(config)
    model = model.to(dtype)
    model.rope_inv_freq = model.rope_inv_freq.float()  # float32 always, as fill_model makes it
    if cfg.quantize:  # each linear but lm_head as the NF4 layer nf4_loader makes, its tensors fake
        from lora.quant_shapes import fake_nf4_linear
        for name, m in list(model.named_modules()):
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, fake_nf4_linear(m, dtype, mode))
    lora.inject_lora(model, lora_config(cfg), quantize=cfg.quantize, compute_dtype=dtype)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # as build_model: A and B in float32
    world = cfg.estimate_world_size
    fsdp = world > 1 and cfg.parallel == "fsdp"
    with memory_estimate.fake_process_group(world) if fsdp else nullcontext(), mode.storage_resizes():
        if fsdp:  # parallel.wrap's sharding, each parameter then rank 0's shard (load_shards' to_empty)
            parallel.shard(model)
            with mode.meta_inputs():
                model.to_empty(device="cpu")
                model.tie_weights()
                model.rope_inv_freq = model_module.rope_frequencies(config)
        else:
            memory_estimate.to_fake(model, mode)
        return estimate_run(cfg, model, mode, device, dtype, world, t0)


def estimate_run(cfg: TrainConfig, model, mode, device: str, dtype: torch.dtype, world: int, t0: float):
    """estimate_step's step, on the fake model: what it holds marked, then two steps counted."""
    if cfg.lora_init != "default":  # PiSSA's start (its SVD, fake), and the (A0, B0) it keeps for saving
        with mode:
            lora.pissa_init_(lora.lora_modules(model), lora.pissa.niter_of(cfg.lora_init))
    for m in model.modules():  # what the model holds, by kind
        for t in memory_estimate.module_tensors(m):
            mode.mark(t, memory_estimate.LORA if t.requires_grad else memory_estimate.WEIGHTS)
    weights = memory_estimate.weights_by_kind(model, mode)
    model.grad_checkpointing = cfg.grad_checkpointing
    model.neftune_alpha = cfg.neftune_alpha
    if cfg.grad_checkpointing:  # a checkpointed block keeps its input for the recomputation
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda _, args: mode.mark(args[0], memory_estimate.SAVED))
    model.train()
    loss_fn = (dpo.PreferenceLoss(model, cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_loss, cfg.dpo_rpo_alpha)
               if cfg.objective == "dpo" else LanguageModelLoss(model))
    batch = worst_batch(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = model_module.modelled_cuda() if device == "cuda" else nullcontext()
    batches = [memory_estimate.fake_batch(batch, mode) for _ in range(min(cfg.grad_accum, 2))]
    with mode, cuda, mode.saved_for_backward():
        if world > 1 and cfg.parallel == "ddp":  # DDP's Reducer: a flat copy of every gradient, in buckets
            buckets = torch.empty(sum(p.numel() for p in params), dtype=torch.float32)
            mode.mark(buckets, memory_estimate.BUCKETS)
        optimizer, scaler = build_optimizer(cfg, model, "cpu", torch.float32)  # (the scaler: off)
        autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
        mode.reset_peak()  # build_model's reset: the peak is the step's
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            mode.phase = "forward"  # (backward: while autograd's engine runs a node)
            accumulate(loss_fn, batches, scaler, autocast, sum(b["n_loss"] for b in batches), loss_fn.STATS)
            for p in params:
                mode.mark(p.grad, memory_estimate.GRADS)
            mode.phase = "optimizer"
            update(optimizer, scaler, params, cfg.max_grad_norm)
            for state in optimizer.state.values():
                for t in state.values():
                    mode.mark(t, memory_estimate.OPTIMIZER)
    return mode.estimate(device, weights, time.perf_counter() - t0)


def worst_batch(cfg: TrainConfig) -> dict:
    """micro_batch_size rows of max_seq_len tokens, every one trained, made and counted by the run's
    own collators (data.make_batch, data.make_pair_batch) and to_device on the CPU."""
    B, T = cfg.micro_batch_size, cfg.max_seq_len
    example = {"input_ids": [1] * T, "labels": [1] * T}
    if cfg.objective == "dpo":
        pair = {"chosen_ids": example["input_ids"], "chosen_labels": example["labels"],
                "rejected_ids": example["input_ids"], "rejected_labels": example["labels"]}
        if cfg.dpo_precompute_ref:
            pair.update(ref_chosen=0.0, ref_rejected=0.0)
        batch = data.make_pair_batch([pair] * B, list(range(B)), 0)
    elif cfg.pack:
        batch = data.make_batch([example] * B, [[i] for i in range(B)], 0, pack=True)
    else:
        batch = data.make_batch([example] * B, list(range(B)), 0)
    return to_device(batch, "cpu")


# -----------------------------------------------------------------------------
# the command

def run(argv=None):
    cfg = parse_config(argv)
    if cfg.estimate_memory:
        estimate_command(cfg)
    elif cfg.eval_only:
        evaluate_only(cfg)
    elif cfg.sweep:
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
