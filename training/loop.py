"""The run, read top to bottom: its phases, then the loop of optimizer steps.

The update, per optimizer step, is that of Hu et al. (2021): only the low-rank A and B of each
target linear layer train (h = W0 x + (alpha / r) B A x), the base model stays frozen. The loss of a
step is the sum of the token losses of all its micro-batches divided by the number of trained
tokens in the whole step, so micro-batch 4 x accumulation 1 gives the same update as 1 x 4.

`run_training` reads in the order a run happens. The settings (training/settings.py: TrainConfig,
checked before any work) go through named phases (training/phases.py): `start_run` (device, dtype,
output directory), `check_model_limits` (what the model's config bounds), `load_data`
(training/batches.py), `plan_steps` (how many steps; with --resume, where to continue),
`build_model` (the frozen base, LoRA injected), `build_optimizer`. Then the loop: per optimizer
step, `train_step` (training/step.py: micro-batches, backward, clip, update), logging, `evaluate`,
`save_checkpoint`; the steps' micro-batches are collated a step or two ahead, on a thread of their
own (`step_batches`). GRPO's steps train on completions sampled from those micro-batches of prompts
(training/grpo_loop.py: every --grpo-iterations steps a generation).
"""

import os
import signal
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import data
from model.fused import textbook_path

from . import grpo_loop, metrics, parallel, run_dir
from .checkpoint import save_checkpoint
from .evaluate import evaluate_and_sample, sample_prompts
from .batches import step_batches
from .phases import (Position, Run, adapter_side_files, build_model, build_optimizer, check_model_limits, load_data, lora_config, plan_steps,
                     reference_logps, resume, start_run)
from .settings import TrainConfig
from .step import check_finite, grad_report, lora_weights, lr_at, train_step


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; return a summary (final loss, val losses, wall time...).

    One run per --output-dir at a time: rank 0 holds its lock while the run lasts."""
    with run_dir.locked(Path(cfg.output_dir), owner=os.environ.get("RANK", "0") == "0"), \
            textbook_path(cfg.textbook):
        return run_training(cfg)


def run_training(cfg: TrainConfig) -> dict:
    starting_over = cfg.resume and run_dir.never_stepped(Path(cfg.output_dir))
    if starting_over:  # stopped before its first step: no checkpoint to continue from, so step 0
        cfg = replace(cfg, resume=False)
    run = start_run(cfg, starting_over)
    check_model_limits(cfg, run)
    ds = load_data(cfg, run)
    plan = plan_steps(cfg, run, ds)
    adapter_files = adapter_side_files(run, ds, plan)
    lora_cfg = lora_config(cfg)
    model, loss_fn, train_loss_fn = build_model(cfg, run, lora_cfg, resuming=plan.checkpoint is not None)
    ready_data(cfg, ds, model, loss_fn, run, resuming=plan.checkpoint is not None)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after FSDP2 swapped them for shards
    optimizer, scaler = build_optimizer(cfg, model, run.device, run.dtype)
    pos = resume(plan.checkpoint, model, optimizer, scaler, run) if plan.checkpoint else Position()
    logs = metrics.RunLog(run.out, run.console, plan.total_steps, cfg.log_every, pos.step if plan.checkpoint else None,
                          plan.settings, plan.defining, plan.changed)
    gen = grpo_loop.start(cfg, ds, run, model, logs, plan.checkpoint, pos.step)  # GRPO's sampling, else None
    evaluation = partial(evaluate_and_sample, loss_fn, model, ds, sample_prompts(cfg, ds), cfg, run.autocast)
    first_val = {} if plan.checkpoint else logs.first_eval(pos.step, *evaluation())
    losses, row, streak, batches = [], first_val, 0, None  # streak: fp16 steps skipped in a row

    # --- the loop: one iteration is one optimizer step of grad_accum micro-batches
    stop, bar = StopRequest(), ProgressBar(run.console, plan.total_steps, pos.step)
    batches_ahead = step_batches(ds, cfg, pos.epoch, pos.index, plan.total_steps - pos.step)
    with data.Prefetcher(batches_ahead) as steps:  # collated on a thread, ahead of the steps
        while pos.step < plan.total_steps:
            t0 = time.perf_counter()
            lr = lr_at(pos.step, cfg, plan.total_steps, plan.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+: B's groups at ratio x lr
            if gen is None or gen.due(pos.step):  # GRPO: the step's prompts, every grpo_iterations steps
                pos.epoch, pos.index, batches = next(steps)  # this step's micro-batches; the position after them
            batches = gen.step_batches(batches, pos.step) if gen else batches  # GRPO: completions of the prompts
            before = lora_weights(model) if cfg.debug_grads else None  # for |dA|/|A|, |dB|/|B|
            result = train_step(train_loss_fn, batches, optimizer, scaler, trainable, cfg.max_grad_norm,
                                run.autocast, loss_fn)
            streak = streak + 1 if result.skipped else 0
            check_finite(result, streak, cfg, model, run, pos.step + 1)  # stops a diverged run, before saving
            pos.step += 1
            if cfg.debug_grads:  # the step's gradients are still there to read: zero_grad comes next step
                logs.grads(pos.step, grad_report(model, before))

            # --- log, evaluate, checkpoint
            row = result.row(pos.step, lr, time.perf_counter() - t0, run, pos.epoch) | (gen.figures if gen else {})
            if cfg.eval_every and pos.step % cfg.eval_every == 0 or pos.step == plan.total_steps:
                row.update(logs.eval(pos.step, *evaluation()))
            logs.step(row)
            losses.append(result.loss)
            bar.update(pos.step, row)
            stopping = parallel.any_rank(stop.signal is not None)  # every rank stops after the same step
            if cfg.save_every and pos.step % cfg.save_every == 0 or pos.step == plan.total_steps or stopping:
                save_checkpoint(run.out, pos.step, model, lora_cfg, str(cfg.model), optimizer, scaler,
                                {"epoch": pos.epoch, "index": pos.index}, cfg.keep_checkpoints, adapter_files,
                                gen.checkpoint_files(pos.step) if gen else None)
            if stopping:
                stop.exit(bar, run, pos.step)
    bar.stop()
    parallel.save_adapter(model, lora_cfg, run.out / "adapter", str(cfg.model), adapter_files)  # gathered, rank 0 writes
    return finish(run, logs, pos.step, losses, row, first_val) | {"model": model}


def ready_data(cfg: TrainConfig, ds, model, loss_fn, run: Run, resuming: bool):
    """What the data needs of the model before the first step: --offload-embeddings, the batches
    bring their embedding rows (the validation ones too); --precompute-ref, the reference log-probs."""
    if cfg.offload_embeddings:
        ds.look_up_embeddings(model.model.embed_tokens, cfg.micro_batch_size)
    if cfg.precompute_ref:
        reference_logps(loss_fn, ds, cfg, run, resuming)


def finish(run: Run, logs: metrics.RunLog, steps: int, losses: list, row: dict, first_val: dict) -> dict:
    """The run's logs closed, its summary written and said; -> run_training's result."""
    logs.close()
    last_val = {k: v for k, v in row.items() if k.startswith("val_")}
    wall_s = time.perf_counter() - run.t_start
    metrics.write_summary(run.out, diverged=False, steps=steps, final_loss=losses[-1] if losses else None,
                          **last_val, wall_s=wall_s, replies=logs.replies)
    run.console.print(f"done: {steps} steps in {wall_s:.0f}s; adapter in {run.out / 'adapter'}; "
                      f"TensorBoard: tensorboard --logdir {run.out / 'tensorboard'}")
    parallel.shutdown()
    return {"first_val": first_val, "losses": losses, "last_val": last_val, "wall_s": wall_s, "steps": steps}


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
        self.progress.update(self.task, completed=step, info=metrics.step_info(row))

    def stop(self):
        self.progress.stop()


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

    def exit(self, bar, run: Run, step: int):
        """After the step's checkpoint: say so and exit as the signal asks (128 + its number)."""
        bar.stop()
        signum = self.signal or signal.SIGTERM
        run.console.print(f"stopped by signal {signum} after step {step}; checkpoint saved, continue with --resume")
        sys.exit(128 + signum)
