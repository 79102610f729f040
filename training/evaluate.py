"""Evaluation: the validation loss (DPO: rewards) and sample replies a run logs (GRPO: the validation
prompts answered greedily and their rewards), and --eval-only, a run's closing evaluation of any
model or adapter, training nothing.
"""

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import data
import lora
from model import load_model, resolve_model_dir
from model.generate import generate, sample_completions
from model.runtime import choose_device, choose_dtype, slow_precision_note

from . import parallel
from .batches import TrainData
from .grpo_loop import completion_text, reward_keys
from .phases import Run, check_model_limits, load_data, objective_loss
from .rewards import load_rewards, score
from .settings import TrainConfig, TrainError
from .step import forward_loss, mean_stats, trained_tensors

# what a TrainData's kind holds
UNITS = {"rows": "examples", "pairs": "pairs", "unpaired": "completions", "prompts": "prompts"}


@torch.no_grad()
def evaluate(loss_fn, batches, autocast) -> dict:
    """Validation loss (the mean over trained tokens, or DPO's over pairs, of all ranks' batches)
    and perplexity (SFT), or DPO's rewards, reward accuracy and margin."""
    names = loss_fn.STATS
    if hasattr(loss_fn, "prepare_step"):  # KTO: z0 of the whole evaluation set
        batches = list(batches)
        loss_fn.prepare_step(batches, autocast, parallel.all_reduce_sum(sum(b["n_loss"] for b in batches))[0])
    loss_fn.eval()
    total, n, stat_sums = 0.0, 0, [0.0] * len(names)
    for batch in batches:
        loss, extra = forward_loss(loss_fn, batch, autocast)
        total, n = total + loss.item(), n + batch["n_loss"]
        stat_sums = [a + b for a, b in zip(stat_sums, extra.tolist())] if names else stat_sums
    total, n, *stat_sums = parallel.all_reduce_sum(total, n, *stat_sums)
    loss_fn.train()
    val_loss = total / max(n, 1)
    if names:
        return {"val_loss": val_loss, **mean_stats(loss_fn, stat_sums, n, prefix="val_")}
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
def evaluate_prompts(model, ds: TrainData, cfg: TrainConfig, autocast, n: int = 3) -> tuple[dict, dict]:
    """GRPO's evaluation: each validation prompt answered greedily (one completion, batches of
    micro_batch_size x grpo_group_size rows, as a step samples), the answers scored by the rewards ->
    ({val_reward: the mean weighted total, val_reward_<function>: each function's mean}, the first n
    {prompt: answer}). GRPO has no validation loss: its loss needs sampled groups and their advantages."""
    rewards = load_rewards(cfg.reward, cfg.reward_weights)
    answered = []
    rows = cfg.micro_batch_size * cfg.grpo_group_size
    for i in range(0, len(ds.val), rows):
        part = ds.val[i:i + rows]
        with autocast:
            got = sample_completions(model, [e["prompt_ids"] for e in part], 1, cfg.max_new_tokens, ds.tok.stop_ids,
                                     temperature=0.0)
        answered += [(part[c.prompt_index], completion_text(ds.tok, c)) for c in got]
    if not answered:
        return {}, {}
    examples, texts = [e for e, _ in answered], [t for _, t in answered]
    fields = {k: [e["fields"][k] for e in examples] for k in examples[0]["fields"]}
    total, per_function = score(rewards, [e["prompt_text"] for e in examples], texts, fields)
    row = {"val_reward": total.mean().item(),
           **{f"val_{k}": per_function[i].mean().item() for i, k in enumerate(reward_keys(rewards))}}
    return row, {e["prompt_text"]: t for e, t in answered[:n]}


def evaluate_and_sample(loss_fn, model, ds: TrainData, prompts, cfg: TrainConfig, autocast):
    """The validation loss (and perplexity), and greedy replies to the sample prompts (GRPO:
    evaluate_prompts, the validation prompts' rewards and answers)."""
    if ds.kind == "prompts":
        return evaluate_prompts(model, ds, cfg, autocast)
    row = evaluate(loss_fn, ds.val_batches, autocast) if ds.val_batches else {}
    return row, dict(zip(prompts, sample_replies(model, ds.tok, prompts, cfg.sample_tokens, autocast)))


def load_prompts(path: str) -> list[str]:
    p = Path(path)
    return [line.strip() for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def sample_prompts(cfg: TrainConfig, ds: TrainData, n: int = 3) -> list[str]:
    """The n prompts answered at each evaluation: the first of --sample-prompts' file ('' none),
    or by default the first user turn of each of the first validation conversations, so that the
    samples show the run's own kind of question (no validation data: no samples)."""
    if cfg.sample_prompts is not None:
        return load_prompts(cfg.sample_prompts)[:n]
    if ds.kind == "prompts":  # GRPO: its validation prompts are answered and scored (evaluate_prompts)
        return []
    source = ds.val_file or cfg.data  # validation examples know their record's line in it
    if ds.kind == "pairs":
        records = {line: prompt for line, (prompt, _, _) in data.preference.load_pairs(source)}
    elif ds.kind == "unpaired":
        records = {line: prompt for line, (prompt, _, _) in data.unpaired.load_unpaired(source)}
    else:
        records = dict(data.formats.load_conversations_with_lines(source))
    prompts = []
    for example in ds.val:
        user = [m["content"] for m in records[example["line"]] if m["role"] == "user"]
        if user and len(prompts) < n:
            prompts.append(user[0].strip())
    return prompts


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
    loss_fn = objective_loss(cfg, model)
    source = ds.val_file or cfg.data
    if not ds.val_file and cfg.val_fraction < 1:
        source += (f": the {cfg.val_fraction:g} that training holds out (--val-seed {cfg.val_seed}; "
                   "--val-fraction 1 scores all of it, --val-data FILE another file)")
    console.print(f"scoring {cfg.model}" + (f" with the adapter {cfg.adapter}" if cfg.adapter else "") +
                  f" on {len(ds.val)} {UNITS[ds.kind]} of {source}", markup=False, soft_wrap=True)
    row = evaluate(loss_fn, track(ds.val_batches, description="scoring", console=console, transient=True), autocast)
    prompts = sample_prompts(cfg, ds)
    replies = dict(zip(prompts, sample_replies(model, ds.tok, prompts, cfg.sample_tokens, autocast)))
    counted = sum(b["n_loss"] for b in ds.val_batches)  # trained tokens (pairs, completions)
    result = {"model": str(cfg.model), "model_dir": str(model_dir), "adapter": cfg.adapter,
              "data": str(ds.val_file or cfg.data), "examples": len(ds.val), "trained_tokens": counted,
              "dtype": str(dtype), **row, "replies": replies}
    figures = "  ".join(f"{k} {v:.4f}" for k, v in row.items())
    console.print(f"{figures}  ({counted} {'trained tokens' if ds.kind == 'rows' else UNITS[ds.kind]})", markup=False)
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
