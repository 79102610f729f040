"""The memory rows of bench/gpu_check.py (the other rows are in bench/gpu_rows.py): what loading
holds on the GPU, and the memory estimate (train.py --estimate-memory) beside
torch.cuda.max_memory_allocated for the same step.
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpu_rows import VOCAB, Result, Skip  # noqa: E402


def check_load_memory(ctx, quantize: str | None):
    """The device memory that loading takes (bf16, or NF4 quantized as each linear is read) against
    what the loaded model holds plus one tensor in flight: loading never holds a second copy."""
    from model import load_model
    from model.load import meta_model
    from model.runtime import peak_memory_gib, peak_reserved_gib, reset_peak_memory
    replace = None
    if quantize:
        try:
            from lora.quant import nf4_loader
        except ImportError:
            raise Skip("bitsandbytes is not installed here (carry .gpu/: make gpu-bundle)") from None
        replace = nf4_loader(torch.bfloat16)
    largest = max(t.numel() for t in meta_model(ctx.model_dir).state_dict().values())  # elements
    if ctx.device == "cuda":
        torch.cuda.init()
    reset_peak_memory()
    model = load_model(ctx.model_dir, torch.bfloat16, ctx.device, replace_linear=replace)
    peak, reserved = peak_memory_gib() * 2**10, peak_reserved_gib() * 2**10  # MiB
    held = sum(t.numel() * t.element_size() for t in {**dict(model.named_parameters()),
                                                       **dict(model.named_buffers())}.values()) / 2**20
    # In flight, for the largest tensor: its bf16 copy (a linear before NF4 takes it) and the file's
    # fp32 values on their way into it (write_model saves fp32); 1 MiB for NF4's block scales.
    bound = held + largest * (2 + 4) / 2**20 + 1
    what = f"peak {peak:.1f} MiB allocated, {reserved:.1f} reserved; the model holds {held:.1f} MiB"
    if ctx.device != "cuda":
        raise Skip(f"dry run: {what} (CPU RSS, which counts the file's mapped pages: the bound is CUDA's)")
    return Result(peak, bound, what + " (figure, bound in MiB)")


def check_memory_estimate(ctx, shape: str, quantize: str | None, offload: bool = False, tiles: int = 1):
    """train.py --estimate-memory's counted peak (fake tensors, no GPU) against max_memory_allocated
    of the same two steps run for real (real_step_memory), in train_speed's real shape, bf16,
    micro-batch 2 x 2048, checkpointing, LoRA r 8 on the seven projections (no dropout, as
    train_speed's GPU cases); its total (with the assumed context, workspaces, fragmentation)
    against max_memory_reserved + the context measured, reported. A dry run builds the same at the
    random model's shape, 2 x 64, on the CPU: nothing to compare, CUDA's allocator is what is modelled.
    offload, tiles: with --offload-activations and --tile-mlp (the estimate's device peak)."""
    import training.estimate, training.phases, training.step
    import train_speed
    from model.config import LlamaConfig
    from training.settings import TrainConfig
    if quantize:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise Skip("bitsandbytes is not installed here (carry .gpu/: make gpu-bundle)") from None
    config, length = train_speed.case_config({"model": shape}), 2048
    if ctx.device != "cuda":
        config, length = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=config.tie_word_embeddings, **ctx.shape), 64
    cfg = TrainConfig(micro_batch_size=2, max_seq_len=length, grad_accum=2, grad_checkpointing=True, lora_r=8,
                      lora_alpha=16, lora_dropout=0.0, quantize=quantize, precision="bf16", device=ctx.device,
                      offload_activations=offload, tile_mlp=tiles)
    est = training.estimate.estimate_step(cfg, config, ctx.device, torch.bfloat16)
    real = real_step_memory(cfg, config, ctx.device, torch.bfloat16)
    flags = (", offloaded" if offload else "") + (f", MLP in {tiles} tiles" if tiles > 1 else "")
    case = f"{shape}{' NF4' if quantize else ''} bf16, 2 x {length}, checkpointing{flags}"
    if ctx.device != "cuda":
        raise Skip(f"dry run, at the random model's shape: {case}: counted {est.peak_bytes / 2**20:.1f} MiB "
                   f"({est.phase}); the real step ran on the CPU, which has no max_memory_allocated to compare with")
    return memory_result(case, est, real)


def memory_result(case: str, est, real: dict) -> Result:
    """An Estimate against real_step_memory's bytes: the counted peak within 3% of the allocated."""
    gib = lambda n: round(n / 2**30, 3)
    counted, total = est.peak_bytes / real["allocated"], est.total_bytes / (real["reserved"] + real["context"])
    figures = {"estimate_peak_gib": gib(est.peak_bytes), "allocated_gib": gib(real["allocated"]),
               "peak_ratio": round(counted, 4), "estimate_total_gib": gib(est.total_bytes),
               "reserved_gib": gib(real["reserved"]), "context_gib": gib(real["context"]),
               "total_ratio": round(total, 4)}
    what = (f"{case}: counted {gib(est.peak_bytes):.2f} GiB vs {gib(real['allocated']):.2f} allocated "
            f"({counted:.3f}x); total {gib(est.total_bytes):.2f} vs {gib(real['reserved']):.2f} reserved + "
            f"{gib(real['context']):.2f} context ({total:.3f}x)")
    return Result(abs(counted - 1), 0.03, what, figures)


def real_step_memory(cfg, config, device: str, dtype) -> dict | None:
    """The estimate's two steps for real (training.step.accumulate, training.step.update, its worst batches), the
    model built as build_model builds it from random weights made on the device (each linear NF4 as
    it is made, under --quantize); on CUDA -> bytes: the peak allocated and reserved from the
    build's end on, and the context (the device's used memory less the allocator's reserve)."""
    import lora
    import training.estimate, training.phases, training.step
    import train_speed
    from model import Llama
    from model.load import fill_model
    from model.loss import LanguageModelLoss
    from model.runtime import reset_peak_memory
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(config, **training.phases.model_options(cfg)).to(dtype)
    replace_linear = None
    if cfg.quantize:
        from lora.quant import nf4_loader
        replace_linear = nf4_loader(dtype)
    model = fill_model(model, train_speed.random_weights(config, dtype, device), device, replace_linear)
    lora.inject_lora(model, training.phases.lora_config(cfg), quantize=cfg.quantize, compute_dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # as build_model: A and B in float32
    loss_fn, (optimizer, scaler) = LanguageModelLoss(model.train()), training.phases.build_optimizer(cfg, model, device, dtype)
    # as estimate_step's: worst_batch (counted on the CPU, its ints kept), its tensors moved
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in training.estimate.worst_batch(cfg).items()}
               for _ in range(min(cfg.grad_accum, 2))]
    reset_peak_memory()  # as build_model: the peak is the step's
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        training.step.accumulate(loss_fn, batches, scaler, torch.autocast(device, dtype=dtype),
                         sum(b["n_loss"] for b in batches), loss_fn.STATS)
        training.step.update(optimizer, scaler, params, cfg.max_grad_norm)
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
            "context": total - free - torch.cuda.memory_reserved()}


