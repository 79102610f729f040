"""--estimate-memory: the run's training step counted on fake tensors (training/memory_estimate.py),
with the run's own model building, collators and step functions, so what is counted is what runs.
"""

import json
import time
from contextlib import nullcontext
from dataclasses import replace

import torch

import data
import lora
from model import Llama, LlamaConfig, resolve_model_dir
from model import llama as model_module, offload
from model.runtime import choose_device, choose_dtype

from . import dpo, kto, memory_estimate, parallel
from .batches import step_batch
from .phases import Run, build_optimizer, check_model_limits, lora_config, model_options, objective_loss
from .settings import PAIRED, TrainConfig, TrainError, memory_budget
from .step import accumulate, update


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
            f"{', checkpointing' if cfg.grad_checkpointing else ''}{', ' + cfg.objective.upper() if cfg.objective != 'sft' else ''}, "
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
    with torch.device("meta"):  # built as build_model's load_model builds it
        model = Llama(config, **model_options(cfg))
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
    if cfg.offload_embeddings:  # the table in host memory, as build_model puts it
        mode.to_host(model.model.embed_tokens.weight)
    weights = memory_estimate.weights_by_kind(model, mode)
    if model.grad_checkpointing:  # a checkpointed block keeps its input for the recomputation
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda _, args: mode.mark(args[0], memory_estimate.SAVED))
    model.train()
    loss_fn = objective_loss(cfg, model)
    batch = worst_batch(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = model_module.modelled_cuda() if device == "cuda" else nullcontext()
    batches = [memory_estimate.fake_batch(batch, mode) for _ in range(min(cfg.grad_accum, 2))]
    for b in batches if cfg.offload_embeddings else ():  # each batch brings its embedding rows
        with mode:
            b["inputs_embeds"] = torch.empty(*b["input_ids"].shape, model.config.hidden_size, dtype=dtype)
        mode.mark(b["inputs_embeds"], memory_estimate.BATCH)
    with mode, cuda, mode.saved_for_backward(), offload.observed(mode):  # offloaded: counted apart
        if world > 1 and cfg.parallel == "ddp":  # DDP's Reducer: a flat copy of every gradient, in buckets
            buckets = torch.empty(sum(p.numel() for p in params), dtype=torch.float32)
            mode.mark(buckets, memory_estimate.BUCKETS)
        optimizer, scaler = build_optimizer(cfg, model, "cpu", torch.float32)  # (the scaler: off)
        autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
        mode.reset_peak()  # build_model's reset: the peak is the step's
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            mode.phase = "forward"  # (backward: while autograd's engine runs a node)
            n_loss = sum(b["n_loss"] for b in batches)
            if hasattr(loss_fn, "prepare_step"):  # KTO's z0: forwards without a gradient first
                loss_fn.prepare_step(batches, autocast, n_loss)
            accumulate(loss_fn, batches, scaler, autocast, n_loss, loss_fn.STATS)
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
    own collators (data.make_batch, data.make_pair_batch, data.make_unpaired_batch) and step_batch on
    the CPU (pairs and KTO's examples: as many, each side or row that long)."""
    B, T = cfg.micro_batch_size, cfg.max_seq_len
    example = {"input_ids": [1] * T, "labels": [1] * T}
    if cfg.objective in PAIRED:
        pair = {"chosen_ids": example["input_ids"], "chosen_labels": example["labels"],
                "rejected_ids": example["input_ids"], "rejected_labels": example["labels"]}
        if cfg.precompute_ref:
            pair.update(ref_chosen=0.0, ref_rejected=0.0)
        return step_batch(dpo.count_pairs(data.make_pair_batch([pair] * B, list(range(B)), 0)), "cpu")
    if cfg.objective == "kto":
        one = {"completion_ids": example["input_ids"], "completion_labels": example["labels"],
               "kl_ids": example["input_ids"], "kl_labels": example["labels"], "desirable": True}
        if cfg.precompute_ref:
            one.update(ref_completion=0.0, ref_kl=0.0)
        return step_batch(kto.count_unpaired(data.make_unpaired_batch([one] * B, list(range(B)), 0)), "cpu")
    if cfg.pack:
        batch = data.make_batch([example] * B, [[i] for i in range(B)], 0, pack=True)
    else:
        batch = data.make_batch([example] * B, list(range(B)), 0)
    return step_batch(batch, "cpu")
