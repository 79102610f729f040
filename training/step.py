"""One optimizer step (`train_step`: `accumulate`, then `update`), and what the loop does around it:
the learning-rate schedule, gradient clipping without a host sync, the divergence check, and
--debug-grads' per-module report.
"""

import math
import time
from dataclasses import dataclass

import torch

import lora
from model.runtime import peak_memory_gib, peak_reserved_gib

from . import metrics, parallel
from .phases import Run
from .settings import TrainConfig


@dataclass
class Step:
    """What one optimizer step measured."""
    loss: float  # sum of token losses / trained tokens, over the whole step and all ranks
    grad_norm: float  # the global norm of the LoRA gradients, before clipping
    tokens: int  # tokens in the step (padding excluded), all ranks
    trained_tokens: int  # of which trained (SFT: the loss's denominator; preference: the replies' tokens)
    loss_scale: float | None  # fp16: the scale GradScaler used this step
    skipped: bool  # fp16: GradScaler skipped the update, a gradient having overflowed
    stats: dict  # preference objectives: rewards, their margin (and accuracy), log-probs, ... (objective.metrics)

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
               objective=None) -> Step:
    """One optimizer step: forward and backward of each micro-batch, the gradients accumulating;
    then unscaled (fp16), clipped, and applied. The gradients stay until the next step's zero_grad,
    so the caller can read them (--debug-grads, and the module named when one is not finite).

    The loss is a mean over the whole step (all micro-batches, all ranks) of what each batch's
    n_loss counts: trained tokens (SFT), preference pairs or completions. `objective` is the loss
    module unwrapped (loss_fn may be its DDP): one with STATS (the preference objectives') returns
    their sums beside the loss, and the step reports its `metrics` of them; one with prepare_step
    (KTO's) sees the step's batches first."""
    optimizer.zero_grad(set_to_none=True)
    # Counts were taken on the CPU (to_device) and are summed over ranks there (gloo): the step
    # waits for the device once, below.
    n_loss, trained_tokens, tokens = parallel.all_reduce_sum(*(sum(b[k] for b in batches)
                                                               for k in ("n_loss", "n_trained", "n_tokens")))
    stat_names = getattr(objective, "STATS", ())
    if hasattr(objective, "prepare_step"):
        objective.prepare_step(batches, autocast, n_loss)
    sums = accumulate(loss_fn, batches, scaler, autocast, n_loss, stat_names)
    grad_norm, loss_scale = update(optimizer, scaler, params, max_grad_norm)
    loss_sum, *stat_sums, grad_norm = torch.cat([sums, grad_norm.float()[None]]).tolist()  # the step's one sync
    stats = mean_stats(objective, stat_sums, n_loss)
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


def forward_loss(loss_fn, batch, autocast):
    """Sum of token losses of one micro-batch (fp32) and its trained-token count.

    loss_fn is the model with lm_loss_sum as its forward (model.loss.LanguageModelLoss), under
    torchrun maybe wrapped in DDP."""
    with autocast:
        return loss_fn(batch)


def mean_stats(objective, sums, n: int, prefix: str = "") -> dict:
    """A preference objective's metrics of its STATS sums over n pairs or completions (none for SFT)."""
    return objective.metrics(sums, n, prefix) if getattr(objective, "STATS", ()) else {}


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


def lr_at(step: int, cfg: TrainConfig, total_steps: int, warmup: int) -> float:
    """Learning rate of update number `step` (0-based): linear warmup, then decay to min_lr_ratio."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)  # 0 -> 1 over the decay
    decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress,
             "constant": 1.0}[cfg.lr_schedule]
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


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
    metrics.write_summary(run.out, diverged=True, steps=number - 1, error=message,
                          wall_s=time.perf_counter() - run.t_start)
    raise FloatingPointError(message)


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


def trained_tensors(m) -> dict:
    """A LoRA layer's trained tensors by short name: A, B and, for DoRA, the magnitude m."""
    return {"A": m.lora_A.weight, "B": m.lora_B.weight, **({"m": m.lora_magnitude_vector} if m.use_dora else {})}


def lora_weights(model) -> dict:
    """A copy of every LoRA A and B (and DoRA m; whole, under FSDP), for --debug-grads' update ratios."""
    return {f"{n}.{k}": parallel.full(p.detach()).clone()
            for n, m in lora.lora_modules(model).items() for k, p in trained_tensors(m).items()}


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
